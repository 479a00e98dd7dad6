"""The resolved job: every default filled in, every path absolute; what the daemon and worker receive.

Plain frozen data with a JSON form; it must not read files, validate or talk to anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from inbox_schema.defaults import MODEL_IDS


@dataclass(frozen=True)
class InputFile:
    """One input: `path` is absolute (inside the inbox), `relpath` as written in the manifest."""

    role: str
    path: Path
    relpath: str
    sha256: str | None = None
    size: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"role": self.role, "path": str(self.path), "relpath": self.relpath,
                "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class VideoSettings:
    """`size` is the reference's size string; for i2v only its area counts (output keeps the image's aspect)."""

    size: str
    fps: int | None  # None only for animate with preprocess_fps = -1: the driving video's own fps
    frames: int | None = None  # i2v only; animate's length comes from the driving video

    @property
    def width(self) -> int:
        return int(self.size.split("*")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("*")[1])

    @property
    def max_area(self) -> int:
        return self.width * self.height

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "width": self.width, "height": self.height, "max_area": self.max_area,
                "frames": self.frames, "fps": self.fps}


@dataclass(frozen=True)
class SamplingSettings:
    """`guide_scale` is (low_noise, high_noise) for i2v and one number for animate."""

    steps: int
    shift: float
    guide_scale: float | tuple[float, float]
    solver: str
    seed: int | None = None
    boundary: float | None = None  # i2v only: fraction of 1000 at which the high-noise expert hands over
    timesteps: tuple[int, ...] | None = None  # only with solver "euler"

    def to_dict(self) -> dict[str, object]:
        guide = list(self.guide_scale) if isinstance(self.guide_scale, tuple) else self.guide_scale
        timesteps = list(self.timesteps) if self.timesteps is not None else None
        return {"steps": self.steps, "shift": self.shift, "guide_scale": guide, "solver": self.solver,
                "seed": self.seed, "boundary": self.boundary, "timesteps": timesteps}


@dataclass(frozen=True)
class AnimateSettings:
    mode: str  # "animation" | "replacement"
    refert_num: int
    clip_len: int
    retarget: bool
    relighting_lora: bool
    preprocess_fps: int  # -1 = the driving video's own fps

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """A validated manifest (schema v1) with every default resolved; `seed` is None until resolved."""

    schema: int
    kind: str
    name: str
    priority: int
    prompt: str
    negative_prompt: str
    inputs: dict[str, InputFile]
    video: VideoSettings
    sampling: SamplingSettings
    animate: AnimateSettings | None = None

    @property
    def model_id(self) -> str:
        return MODEL_IDS[self.kind]

    @property
    def seed(self) -> int | None:
        return self.sampling.seed

    def with_seed(self, seed: int) -> Job:
        """The same job with its seed fixed (done once at acceptance when the manifest left it out)."""
        return replace(self, sampling=replace(self.sampling, seed=seed))

    def to_dict(self) -> dict[str, object]:
        return {
            "schema": self.schema, "kind": self.kind, "model_id": self.model_id, "name": self.name,
            "priority": self.priority, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "inputs": {role: item.to_dict() for role, item in self.inputs.items()},
            "video": self.video.to_dict(), "sampling": self.sampling.to_dict(),
            "animate": self.animate.to_dict() if self.animate else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        """Rebuild a job from `to_dict()` output (ledger rows, worker messages); trusts its input."""
        video, sampling, animate = data["video"], data["sampling"], data.get("animate")
        guide = sampling["guide_scale"]
        return cls(
            schema=data["schema"], kind=data["kind"], name=data["name"], priority=data["priority"],
            prompt=data["prompt"], negative_prompt=data["negative_prompt"],
            inputs={role: InputFile(role=role, path=Path(item["path"]), relpath=item["relpath"],
                                    sha256=item["sha256"], size=item["size"])
                    for role, item in data["inputs"].items()},
            video=VideoSettings(size=video["size"], fps=video["fps"], frames=video["frames"]),
            sampling=SamplingSettings(
                steps=sampling["steps"], shift=sampling["shift"],
                guide_scale=tuple(guide) if isinstance(guide, list) else guide,
                solver=sampling["solver"], seed=sampling["seed"], boundary=sampling["boundary"],
                timesteps=tuple(sampling["timesteps"]) if sampling["timesteps"] is not None else None),
            animate=AnimateSettings(**animate) if animate else None,
        )
