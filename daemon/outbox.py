"""Delivery to the outbox: check that the mp4 decodes, then publish mp4, poster JPEG, the kind's extra files
and the JSON sidecar (whose content is made here too, from the job's record and the worker's stats).

Every file is written under a temporary dotfile name, fsynced, and linked to its final name without
ever overwriting (a collision takes the suffix -2, -3, ...). `complete` is the idempotent form used by the
daemon: under a base name chosen (and recorded) beforehand it writes only the files still missing and verifies
those already there. It must not touch inputs or the ledger.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from daemon.diskspace import removed_on_error
from daemon.faults import kill_point
from daemon.jobfiles import fsync_dir, host_tag
from inbox_schema import file_sha256

if TYPE_CHECKING:
    from daemon.ledger import JobRecord

MAX_COLLISIONS = 10_000


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("wanbox")
    except Exception:  # not installed (a checkout): the version in pyproject
        return "0.1.0+checkout"


def sidecar(record: JobRecord, stats: dict[str, Any], pool: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
    """The sidecar's content for a delivered job: what was asked (the resolved job), how it ran, what made it.

    `pool` holds the pool's world_size, devices, parallel layout and runtime versions (from its hello)."""
    job, runtime = record.job, pool.get("runtime") or {}
    return {
        "job_id": record.id,
        "name": record.name,
        "kind": record.kind,
        "model_id": record.model_id,
        "seed": job.seed,
        "parameters": record.params_json,
        "inputs": {role: {k: v for k, v in item.to_dict().items() if k != "path"} for role, item in job.inputs.items()},
        "checkpoint_dir": str(checkpoint_dir),
        "checkpoints": stats.get("checkpoints", "unknown (the worker did not report hashes)"),
        "timings_seconds": record.timings_json or {},
        "gpu_seconds": record.gpu_seconds,
        "peak_memory": stats.get("peak_memory"),
        "model_load": stats.get("model_load"),
        "attention": stats.get("attention"),
        "resumed_from": stats.get("resumed_from"),  # the sampling checkpoint a retried attempt continued from
        "checkpoint": stats.get("checkpoint"),
        # per LoRA: file, sha256, strength, format, experts, method (merged/unmerged), dropped keys (the worker's)
        "loras": stats.get("loras", []),
        **({"lora_switch_seconds": stats["lora_switch_seconds"]} if "lora_switch_seconds" in stats else {}),
        **({"relighting": stats["relighting"]} if "relighting" in stats else {}),  # Animate: applied/reference/off
        "pool": pool,
        "attempts": record.attempts_made,
        "created_at": record.created_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "software": {"wanbox": software_version(), **{k: runtime.get(k) for k in ("torch", "cuda")}},
        "precision": stats.get("precision", "bf16"),
        "resolution_cap": runtime.get("max_area"),  # the pool's [pool] max_area, when it capped the job's size
    }


def extra_outputs(record: JobRecord) -> dict[str, Path]:
    """Files delivered beside the video, as the kind's registry entry names them (e.g. the Animate overlay preview:
    the extracted pose and face box over the driving frames, so a person can see what the model was given)."""
    work = Path(record.work_dir or "/nonexistent")
    found = {role: work / relpath for role, relpath in record.job.spec.outputs}
    return {role: path for role, path in found.items() if path.is_file()}


class OutputInvalid(ValueError):
    """The worker's mp4 does not decode or is not what was asked for."""


class NameTaken(FileExistsError):
    """A file not of this delivery holds one of its names: the delivery must choose another base name."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def probe_video(path: Path) -> VideoInfo:
    """Decode every frame (a header can lie; a truncated file fails here, not at the user's)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OutputInvalid(f"{path}: no video stream")
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError) as exc:
        raise OutputInvalid(f"{path}: does not decode as a video ({exc})") from None
    if frames == 0:
        raise OutputInvalid(f"{path}: no decodable frames")
    return VideoInfo(frames, width, height, fps)


def write_poster(video: Path, dest: Path, quality: int = 90) -> None:
    """The first frame of `video` as a JPEG at `dest` (decoded with PyAV)."""
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0))
        frame.to_image().save(dest, format="JPEG", quality=quality)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(outbox: Path, final_name: str, tag: str = "") -> Path:
    # A dotfile, so tools watching the outbox (and our own inbox rules) skip it as in-progress; `tag` marks the
    # host writing it (jobfiles.host_tag), so that a host's start-up removes only its own leftovers.
    return outbox / f".{final_name}.{secrets.token_hex(4)}{tag}.tmp"


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (size first, then content)."""
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block = fa.read(1 << 20)
                if block != fb.read(1 << 20):
                    return False
                if not block:
                    return True
    except OSError:
        return False


def free_base(outbox: Path, base: str, suffixes: tuple[str, ...]) -> str:
    """`base`, or `base-2`, `base-3`, ... so that no `<base><suffix>` exists yet."""
    for n in range(1, MAX_COLLISIONS):
        candidate = base if n == 1 else f"{base}-{n}"
        if not any(os.path.lexists(outbox / f"{candidate}{s}") for s in suffixes):
            return candidate
    raise FileExistsError(f"{outbox}: more than {MAX_COLLISIONS} outputs named {base!r}")


def publish(temp: Path, final: Path) -> None:
    """Give a complete, fsynced temp file its final name; never replaces an existing file."""
    link_without_replacing(temp, final)
    fsync_dir(final.parent)


def link_without_replacing(temp: Path, final: Path) -> None:
    """Rename `temp` to `final`, raising FileExistsError rather than replacing a file already there."""
    try:
        os.link(temp, final)  # atomic and refuses to overwrite (rename would overwrite)
    except FileExistsError:
        raise
    except OSError:
        # Some shares (SMB, FAT) have no hard links: check, then rename (a tiny race, never a partial file).
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        os.rename(temp, final)
        return
    os.unlink(temp)


class Outbox:
    """The delivery folder: `deliver` puts one job's results there under one free base name."""

    def __init__(self, root: Path, poster: bool = True, host_id: str | None = None) -> None:
        self.root = root
        self.poster = poster
        self.tag = host_tag(host_id)  # in its temporary names: several hosts may write one outbox

    def _suffixes(self, extras: tuple[str, ...] = ()) -> tuple[str, ...]:
        return (".mp4", ".json", *((".jpg",) if self.poster else ()), *extras)

    def _stage_copy(self, src: Path, final_name: str) -> Path:
        temp = _temp_name(self.root, final_name, self.tag)
        with removed_on_error(temp):  # a full disk must not leave a partial .tmp in the outbox
            shutil.copyfile(src, temp)
            _fsync_file(temp)
        return temp

    def _stage_bytes(self, data: bytes, final_name: str) -> Path:
        temp = _temp_name(self.root, final_name, self.tag)
        with removed_on_error(temp), open(temp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return temp

    def _stage_poster(self, video: Path, final_name: str) -> Path:
        temp = _temp_name(self.root, final_name, self.tag)
        with removed_on_error(temp):
            write_poster(video, temp)
            _fsync_file(temp)
        return temp

    def deliver(self, video: Path, base: str, sidecar: dict[str, Any],
                extras: dict[str, Path] | None = None) -> dict[str, str]:
        """Publish video (+ poster, + extras) + sidecar; returns {"video": path, "poster": path, "sidecar":
        path, <extra role>: path}.

        The video is checked by decoding first; the sidecar is written last, so its presence means the
        delivery is complete. The source files are copied, not moved (the caller removes them afterwards).
        `extras` maps a role to a file delivered as `<name>.<role><suffix>` (e.g. the Animate overlay preview
        as `<name>.preview.mp4`).
        """
        info = probe_video(video)
        self.root.mkdir(parents=True, exist_ok=True)
        extra_suffixes = {role: f".{role}{path.suffix}" for role, path in (extras or {}).items()}
        staged: list[Path] = []
        try:
            staged.append(self._stage_copy(video, f"{base}.mp4"))
            if self.poster:
                staged.append(self._stage_poster(video, f"{base}.jpg"))
            for role, path in (extras or {}).items():
                staged.append(self._stage_copy(path, f"{base}{extra_suffixes[role]}"))
            return self._publish_all(staged, base, info, sidecar, extra_suffixes)
        finally:
            for temp in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _publish_all(self, staged: list[Path], base: str, info: VideoInfo, sidecar: dict[str, Any],
                     extra_suffixes: dict[str, str]) -> dict:
        # A concurrent writer could take the name between the check and the link: try the next one.
        for _ in range(MAX_COLLISIONS):
            name = free_base(self.root, base, self._suffixes(tuple(extra_suffixes.values())))
            outputs = {"video": str(self.root / f"{name}.mp4"), "sidecar": str(self.root / f"{name}.json")}
            if self.poster:
                outputs["poster"] = str(self.root / f"{name}.jpg")
            outputs |= {role: str(self.root / f"{name}{suffix}") for role, suffix in extra_suffixes.items()}
            # The sidecar is written before anything is published: a disk too full for it delivers nothing.
            document = {**sidecar, "outputs": outputs, "video": info.__dict__}
            data = json.dumps(document, indent=2, sort_keys=True, default=str).encode() + b"\n"
            staged.append(self._stage_bytes(data, f"{name}.json"))  # removed by deliver's finally once linked
            try:
                publish(staged[0], self.root / f"{name}.mp4")
            except FileExistsError:
                os.unlink(staged.pop())
                continue
            if self.poster:
                publish(staged[1], self.root / f"{name}.jpg")
            for temp, role in zip(staged[1 + self.poster : -1], extra_suffixes, strict=True):
                publish(temp, Path(outputs[role]))
            publish(staged[-1], self.root / f"{name}.json")
            return outputs
        raise FileExistsError(f"{self.root}: could not find a free name for {base!r}")

    # --- the idempotent delivery (a redo completes or verifies the same files) -------------------------

    def names(self, base: str, extras: dict[str, Path] | None = None) -> dict[str, str]:
        """role -> outbox path of a delivery under `base` (video, poster, the extras, sidecar)."""
        outputs = {"video": str(self.root / f"{base}.mp4")}
        if self.poster:
            outputs["poster"] = str(self.root / f"{base}.jpg")
        outputs |= {role: str(self.root / f"{base}.{role}{path.suffix}") for role, path in (extras or {}).items()}
        return outputs | {"sidecar": str(self.root / f"{base}.json")}

    def free_name(self, base: str, extras: dict[str, Path] | None = None) -> str:
        """`base` or the first `base-N` under which no file of such a delivery exists yet."""
        self.root.mkdir(parents=True, exist_ok=True)
        suffixes = tuple(Path(p).name.removeprefix(base) for p in self.names(base, extras).values())
        return free_base(self.root, base, suffixes)

    def complete(self, video: Path, base: str, sidecar: dict[str, Any], extras: dict[str, Path] | None = None,
                 guard: Callable[[], None] | None = None) -> dict[str, str]:
        """Publish every file of this delivery under `base` that is not there yet, the sidecar last; returns
        the outputs. A file already there is verified to be this delivery's (the same bytes; for the sidecar,
        the same job id), else NameTaken. Safe to call again after a crash at any point. `guard()` is called
        before each file is published and raises to stop (the delivery's fencing: the job is still ours)."""
        check = guard or (lambda: None)
        info = probe_video(video)
        self.root.mkdir(parents=True, exist_ok=True)
        outputs = self.names(base, extras)
        sources = {"video": video, **(extras or {})}
        for role, final in outputs.items():
            if role == "sidecar":
                continue
            check()
            if role == "poster":
                self._complete_one(Path(final), lambda name: self._stage_poster(video, name))
            else:
                self._complete_one(Path(final), lambda name, src=sources[role]: self._stage_copy(src, name),
                                   source=sources[role])  # fmt: skip
        document = {**sidecar, "outputs": outputs, "video": info.__dict__}
        data = json.dumps(document, indent=2, sort_keys=True, default=str).encode() + b"\n"
        check()
        self._complete_one(Path(outputs["sidecar"]), lambda name: self._stage_bytes(data, name),
                           job_id=sidecar.get("job_id"))  # fmt: skip
        return outputs

    def withdraw(self, base: str, video_sha256: str, job_id: str, extras: dict[str, Path] | None = None) -> None:
        """Remove an unfinished earlier delivery of this job under `base`: only if the mp4 there is the one it
        delivered (by sha256; the mp4 is published first, so the poster and extras there are its too), and
        the sidecar only if it names this job."""
        outputs = self.names(base, extras)
        video = Path(outputs["video"])
        if not video.is_file() or file_sha256(video) != video_sha256:
            return
        for role, path in outputs.items():
            final = Path(path)
            if role == "sidecar" and not self._is_ours(final, None, None, job_id):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
        fsync_dir(self.root)

    def _complete_one(self, final: Path, stage: Any, source: Path | None = None, job_id: Any = None) -> None:
        if os.path.lexists(final):
            if not self._is_ours(final, stage, source, job_id):
                raise NameTaken(errno.EEXIST, "a file of another delivery is there", str(final))
            return
        temp = stage(final.name)
        try:
            kill_point("finalize.staged")
            try:
                publish(temp, final)
            except FileExistsError:
                raise NameTaken(errno.EEXIST, "a file of another delivery is there", str(final)) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        kill_point("finalize.published")

    def _is_ours(self, final: Path, stage: Any, source: Path | None, job_id: Any) -> bool:
        """Whether the file at `final` is what this delivery writes there (a crash left it complete)."""
        if job_id is not None:  # the sidecar: its job id says whose it is (its finish time differs on a redo)
            try:
                return json.loads(final.read_text(encoding="utf-8")).get("job_id") == job_id
            except (OSError, ValueError, AttributeError):
                return False
        if source is not None:
            return same_bytes(final, source)
        temp = stage(final.name)  # the poster: made again, compared byte for byte
        try:
            return same_bytes(final, temp)
        finally:
            os.unlink(temp)


def check_output(info: VideoInfo, job: Any, stats: dict[str, Any]) -> None:
    """The decoded video is what the job asked for and what the worker says it wrote; OutputInvalid saying what
    differs otherwise (frames, size, fps), so that a wrong video is never delivered as if it were right."""
    video, problems = job.video, []
    if video.frames is not None and info.frames != video.frames:
        problems.append(f"{info.frames} frames decoded, the job asks for {video.frames} (video.frames)")
    if isinstance(stats.get("frames"), int) and info.frames != stats["frames"]:
        problems.append(f"{info.frames} frames decoded, the worker reported {stats['frames']}")
    if info.width * info.height > video.max_area:
        problems.append(f"size {info.width}x{info.height} decoded, larger than the job's {video.size} (video.size)")
    said = (stats.get("width"), stats.get("height"))
    if all(isinstance(v, int) for v in said) and said != (info.width, info.height):
        problems.append(f"size {info.width}x{info.height} decoded, the worker reported {said[0]}x{said[1]}")
    fps = video.fps if video.fps is not None else stats.get("fps")
    if isinstance(fps, (int, float)) and abs(info.fps - fps) > 0.01:
        problems.append(f"{info.fps:g} fps decoded, expected {fps:g} (video.fps)")
    if problems:
        raise OutputInvalid("the worker's video is not what was asked for: " + "; ".join(problems))
