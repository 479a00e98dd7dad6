"""The resolved job: every default filled in, every path absolute; the one form a job travels in.

The ledger stores `Job.to_dict()`, the pool's `run` command carries it, and `Job.from_dict` is its only reader
(strict: inbox_schema.codec). Plain frozen data; it must not read files, validate ranges or talk to anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from inbox_schema import codec
from inbox_schema.kinds import Kind, get_kind
from inbox_schema.notify import NotifyTargets


@dataclass(frozen=True)
class InputFile:
    """One input: `path` is absolute (inside the inbox), `relpath` as written in the manifest."""

    role: str
    path: Path
    relpath: str
    sha256: str | None
    size: int | None

    @property
    def field(self) -> str:
        """The manifest field that names it: inputs.<role>, or lora[i].path for an uploaded LoRA."""
        return f"{self.role}.path" if self.role.startswith("lora[") else f"inputs.{self.role}"

    def to_dict(self) -> dict[str, object]:
        return {"role": self.role, "path": str(self.path), "relpath": self.relpath,
                "sha256": self.sha256, "size": self.size}


LIBRARY, UPLOAD = "library", "upload"  # where a LoRA file comes from


@dataclass(frozen=True)
class LoraEntry:
    """One [[lora]] of the manifest: a file of the server's LoRA library or uploaded with the job (then an input
    of the job like the image: staged, verified, moved to work/), its strength and the models it goes on."""

    source: str  # LIBRARY or UPLOAD
    file: str  # as written: the name inside the library, or the upload's path relative to the manifest
    strength: float
    experts: tuple[str, ...]  # i2v: "high_noise" and/or "low_noise"; () = the kind's one model (animate)
    path: Path | None = None  # absolute: the upload (inbox, then work/) or the library file; None = library unknown
    sha256: str | None = None  # as declared; after acceptance, the file's
    size: int | None = None  # uploads: as declared

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "file": self.file, "strength": self.strength, "experts": list(self.experts),
                "path": None if self.path is None else str(self.path), "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class VideoSettings:
    """`size` is the reference's size string; for i2v only its area counts (output keeps the image's aspect)."""

    size: str
    fps: int | None  # None only for animate with preprocess_fps = -1: the driving video's own fps
    frames: int | None  # i2v only; animate's length comes from the driving video

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
    seed: int | None  # None until acceptance draws one
    boundary: float | None  # i2v only: fraction of 1000 at which the high-noise expert hands over
    timesteps: tuple[int, ...] | None  # only with solver "euler"
    preset: str | None = None  # the [sampling] preset whose values filled the fields the manifest left out

    def to_dict(self) -> dict[str, object]:
        guide = list(self.guide_scale) if isinstance(self.guide_scale, tuple) else self.guide_scale
        timesteps = list(self.timesteps) if self.timesteps is not None else None
        return {"steps": self.steps, "shift": self.shift, "guide_scale": guide, "solver": self.solver,
                "seed": self.seed, "boundary": self.boundary, "timesteps": timesteps, "preset": self.preset}


@dataclass(frozen=True)
class Job:
    """A validated manifest (schema v1) with every default resolved; `seed` is None until resolved.

    `options` holds the kind's own settings (its registry entry's OptionsTable, e.g. AnimateSettings for
    kind "animate"), or None for a kind without a table of its own. `loras` are the [[lora]] entries in order.
    """

    schema: int
    kind: str
    name: str
    priority: int
    prompt: str
    negative_prompt: str
    inputs: dict[str, InputFile]
    video: VideoSettings
    sampling: SamplingSettings
    options: Any = None
    # Fields added after the first release have defaults: a job stored by an earlier version reads as before.
    notify: NotifyTargets = NotifyTargets()
    loras: tuple[LoraEntry, ...] = ()

    @property
    def spec(self) -> Kind:
        """The kind's registry entry."""
        return get_kind(self.kind)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def seed(self) -> int | None:
        return self.sampling.seed

    def with_seed(self, seed: int) -> Job:
        """The same job with its seed fixed (done once at acceptance when the manifest left it out)."""
        return replace(self, sampling=replace(self.sampling, seed=seed))

    def with_inputs(self, inputs: dict[str, InputFile]) -> Job:
        """The same job reading its inputs elsewhere (moved into the work folder at acceptance)."""
        if set(inputs) != set(self.inputs):
            raise ValueError(f"inputs: got roles {sorted(inputs)}, expected {sorted(self.inputs)}")
        return replace(self, inputs=dict(inputs))

    def files(self) -> dict[str, InputFile]:
        """Every file the job brings into the inbox: its inputs by role, then its uploaded LoRAs as lora[i]."""
        found = dict(self.inputs)
        for i, lora in enumerate(self.loras):
            if lora.source == UPLOAD and lora.path is not None:
                found[f"lora[{i}]"] = InputFile(f"lora[{i}]", lora.path, lora.file, lora.sha256, lora.size)
        return found

    def with_files(self, files: dict[str, InputFile]) -> Job:
        """The same job reading its files elsewhere (`files()` moved into the work folder at acceptance)."""
        if set(files) != set(self.files()):
            raise ValueError(f"files: got {sorted(files)}, expected {sorted(self.files())}")
        loras = tuple(replace(lora, path=files[key].path, sha256=files[key].sha256) if (key := f"lora[{i}]") in files
                      else lora for i, lora in enumerate(self.loras))
        return replace(self.with_inputs({role: files[role] for role in self.inputs}), loras=loras)

    def with_lora_sha256(self, index: int, sha256: str) -> Job:
        """The same job with the content hash of LoRA `index` recorded (library files are hashed at acceptance)."""
        loras = list(self.loras)
        loras[index] = replace(loras[index], sha256=sha256)
        return replace(self, loras=tuple(loras))

    def to_dict(self) -> dict[str, object]:
        """The JSON form (ledger, `run` command, `wanbox validate`): the kind's table under its own name."""
        data: dict[str, object] = {
            "schema": self.schema, "kind": self.kind, "model_id": self.model_id, "name": self.name,
            "priority": self.priority, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "inputs": {role: item.to_dict() for role, item in self.inputs.items()},
            "video": self.video.to_dict(), "sampling": self.sampling.to_dict(), "notify": self.notify.to_dict(),
            "loras": [lora.to_dict() for lora in self.loras],
        }
        table = self.spec.options
        if table is not None:
            data[table.table] = codec.write(self.options)
        return data

    @classmethod
    def from_dict(cls, data: object, where: str = "job") -> Job:
        """The job a `to_dict()` made (ledger rows, `run` commands), checked field by field: JobDataError names
        the first field that is missing, unknown or of the wrong type (as `<where>.<field>`)."""
        if not isinstance(data, dict):
            raise codec.JobDataError(f"{where}: got {data!r}, expected an object")
        fields = dict(data)
        fields.pop("model_id", None)  # derived from the kind
        # Fields added after a job's form was first stored: rows queued by an earlier version lack them.
        fields.setdefault("loras", [])
        if isinstance(fields.get("sampling"), dict):
            fields["sampling"] = {"preset": None, **fields["sampling"]}
        kind = fields.get("kind")
        try:
            table = get_kind(kind).options if isinstance(kind, str) else None
        except KeyError as exc:
            raise codec.JobDataError(f"{where}.kind: {exc.args[0]}") from None
        raw_options = fields.pop(table.table, None) if table is not None else None
        job = codec.read(cls, {**fields, "options": None}, where)  # the kind's own table is read below
        if table is not None:
            job = replace(job, options=codec.read(table.settings, raw_options, f"{where}.{table.table}"))
        for role, item in job.inputs.items():
            if item.role != role:
                raise codec.JobDataError(f"{where}.inputs.{role}.role: got {item.role!r}, expected {role!r}")
        if set(job.inputs) != set(job.spec.roles):
            raise codec.JobDataError(f"{where}.inputs: got roles {sorted(job.inputs)}, expected "
                                     f"{sorted(job.spec.roles)} for kind {job.kind!r}")
        return job
