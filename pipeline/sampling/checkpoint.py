"""Sampling checkpoints: everything that continues a denoising loop exactly, in one file written atomically.

Serialises, verifies and decides when to write; it must not run models or know the pool (the pool's part,
fingerprints of a run command and sharing across ranks, is pipeline/parallel/resume.py).

The file, <folder>/sampling_state.safetensors, is plain safetensors: the tensors in their own dtype (the loop
works in float32, so float32; nothing widened to float64) and one metadata entry "wanbox", a JSON header with
the format, the job and model fingerprints, the loop key, clip/step, expert, solver scalars, the layout that
wrote it and the sha256 of the tensor bytes. A partial, foreign or damaged file is ignored with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline.sampling.base import FlowSolver, SolverError, SolverState

FORMAT = "wanbox-sampling-checkpoint/1"
FILE_NAME = "sampling_state.safetensors"
HEADER_KEY = "wanbox"
logger = logging.getLogger(__name__)


class CheckpointUnreadable(ValueError):
    """The file is not a whole checkpoint of this format (truncated, garbage, damaged)."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to write: after `every_steps` steps or `every_seconds` seconds since the last write, whichever
    comes first (None = that trigger off), and always when a loop (an Animate clip) ends."""

    every_steps: int | None = None
    every_seconds: float | None = 120.0
    enabled: bool = True

    def __post_init__(self) -> None:
        steps, seconds = self.every_steps, self.every_seconds
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"every_steps: got {steps!r}, expected an integer >= 1 or none")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not math.isfinite(seconds) or seconds <= 0):
            raise ValueError(f"every_seconds: got {seconds!r}, expected a number > 0 or none")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled: got {self.enabled!r}, expected true or false")

    def due(self, steps_since: int, seconds_since: float) -> bool:
        by_steps = self.every_steps is not None and steps_since >= self.every_steps
        by_time = self.every_seconds is not None and seconds_since >= self.every_seconds
        return self.enabled and (by_steps or by_time)


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint may only be used for: `job` (its parameters and inputs), `model` (weights, dtype)."""

    job: str
    model: str


def digest(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form (sorted keys), e.g. a job's parameters."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def loop_key(family: str, solver: FlowSolver, clips: int, latent_shape: Any, **extra: Any) -> dict[str, Any]:
    """The part of a checkpoint's identity that the loop itself knows: schedule, clip count, latent shape (what
    CheckpointStore.begin needs) plus the family's own values (guide scales, expert boundary, ...)."""
    return {"family": family, "clips": clips, "steps": solver.num_steps, "latent_shape": list(latent_shape),
            "solver": solver.name, "timesteps": solver.timesteps.tolist(), "sigmas": solver.sigmas.tolist(), **extra}


@dataclass
class SamplingState:
    """A loop after `step` denoising steps of clip `clip` (0-based; I2V has the one clip 0).

    solver: FlowSolver.state_dict(); expert: the MoE expert of the last step done; rng: the state of a
    generator that is still drawn from later (Animate's per-clip noise), else None; finished: the final latents
    of the clips before `clip` (Animate re-decodes them on resume: the frames and the carried-over tail follow);
    layout: where it was written (world size, parallel plan, device, dtype), for the bitwise note."""

    clip: int
    step: int
    latent: torch.Tensor
    solver: SolverState
    expert: str | None = None
    rng: torch.Tensor | None = None
    finished: list[torch.Tensor] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """One job's checkpoint file, as one rank sees it.

    writer: only this rank reads and writes the file (rank 0 under Ulysses/CFG-parallel: every rank holds the
    same full latent); share(value) hands the writer's verdict to every rank (a broadcast; identity in one
    process), so all ranks resume from the same state or none does. Call begin() once per job, then tick()
    after every step and save() when it says so; clear() once the output is safe.
    """

    def __init__(self, folder: str | os.PathLike[str], fingerprint: Fingerprint | None,
                 policy: CheckpointPolicy | None = None, *, layout: dict[str, Any] | None = None,
                 writer: bool = True, share: Callable[[Any], Any] | None = None,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if writer and fingerprint is None:
            raise ValueError("fingerprint: the writing rank needs the job's and the model's fingerprints")
        self.path = Path(folder) / FILE_NAME
        self.fingerprint, self.policy = fingerprint, policy or CheckpointPolicy()
        self.layout, self.writer = dict(layout or {}), writer
        self.share = share or (lambda value: value)
        self.log, self.clock = log or logger.warning, clock
        self.loop: dict[str, Any] = {}
        self.resumed_from: dict[str, Any] | None = None
        self.ignored: str | None = None
        self.write_error: str | None = None
        self.writes, self.bytes, self.write_seconds = 0, 0, 0.0
        self._steps_since, self._saved_at = 0, clock()

    # -- resume

    def begin(self, loop: dict[str, Any], solver: FlowSolver, device: torch.device | str | None = None
              ) -> SamplingState | None:
        """Declare the loop (its key must hold "clips", "steps", "latent_shape") and get the state to continue
        from, already loaded into the fresh `solver`; None to start from the beginning (the reason, if a file
        was there but not usable, is logged and kept in `ignored`)."""
        self.loop = json.loads(json.dumps(loop))  # the form it takes in the file: tuples become lists
        self._steps_since, self._saved_at = 0, self.clock()
        shared = self.share(self._read() if self.writer else None)  # the writer's verdict, on every rank
        state, reason = shared if shared is not None else (None, None)
        if state is not None:
            try:
                solver.load_state_dict(state.solver, device)
            except SolverError as exc:
                state, reason = None, f"its solver state does not fit this run: {exc}"
        if reason is not None:
            self.ignored = f"{self.path}: ignored, {reason}; starting from the first step"
            self.log(self.ignored)
        if state is not None:
            self._resumed(state)
        return state

    def _read(self) -> tuple[SamplingState | None, str | None]:
        self._remove_leftovers()
        if not self.path.is_file():
            return None, None
        try:
            header, tensors = decode(self.path.read_bytes())
        except (OSError, CheckpointUnreadable) as exc:
            return None, f"unreadable ({exc})"
        assert self.fingerprint is not None
        reason = mismatch(header, tensors, self.fingerprint, self.loop)
        if reason:
            return None, reason
        try:
            return to_state(header, tensors), None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a header this build did not write
            return None, f"inconsistent: {type(exc).__name__}: {exc}"

    def _resumed(self, state: SamplingState) -> None:
        changed = sorted(k for k in set(state.layout) | set(self.layout)
                         if state.layout.get(k) != self.layout.get(k))
        self.resumed_from = {"clip": state.clip, "step": state.step, "expert": state.expert,
                             "layout_changed": changed}
        note = ""
        if changed:
            note = (f"; it was written with {_pairs(state.layout, changed)}, this run has "
                    f"{_pairs(self.layout, changed)}: the result equals neither layout's uninterrupted run "
                    "bitwise (other matmul shapes per rank and reduction orders round differently), only "
                    "within float32 (CPU) / bf16 (GPU) rounding noise")
        where = f"clip {state.clip + 1} of {self.loop['clips']}, " if self.loop["clips"] > 1 else ""
        self.log(f"{self.path}: resuming {where}after step {state.step} of {self.loop['steps']}{note}")

    # -- write

    def tick(self, final: bool = False) -> bool:
        """One step done: is a save due on this rank (always at the end of a loop, when `final`)?"""
        self._steps_since += 1
        if not (self.writer and self.policy.enabled):
            return False
        return final or self.policy.due(self._steps_since, self.clock() - self._saved_at)

    def save(self, state: SamplingState) -> None:
        """Write `state` atomically (temp file, fsync, rename, fsync of the folder). A failed write is logged
        and kept in `write_error`, never raised: losing a checkpoint must not lose the job."""
        started = self.clock()
        assert self.fingerprint is not None, "only the writing rank saves"
        state.layout = dict(self.layout)
        try:
            data = encode(state, self.fingerprint, self.loop)
            write_atomic(self.path, data)
        except OSError as exc:
            self.write_error = f"{self.path}: could not write the checkpoint: {exc}"
            self.log(self.write_error)
            return
        finally:
            self._steps_since, self._saved_at = 0, self.clock()
        self.writes, self.bytes = self.writes + 1, len(data)
        self.write_seconds += self.clock() - started

    def clear(self) -> None:
        """Remove the checkpoint and any temp file (the job's output is safe)."""
        clear_checkpoint(self.path.parent)

    def _remove_leftovers(self) -> None:
        remove_leftovers(self.path.parent)

    def stats(self) -> dict[str, Any]:
        """For the `done` message: where it resumed (None = from the start) and what checkpointing cost."""
        return {"resumed_from": self.resumed_from,
                "checkpoint": {"writes": self.writes, "bytes": self.bytes,
                               "write_seconds": round(self.write_seconds, 3), "ignored": self.ignored,
                               "write_error": self.write_error}}


def clear_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Remove the checkpoint file in `folder` and any temp file left beside it; nothing else."""
    (Path(folder) / FILE_NAME).unlink(missing_ok=True)
    remove_leftovers(Path(folder))


def remove_leftovers(folder: Path) -> None:
    # a writer killed between creating and renaming its temp file leaves it behind
    if folder.is_dir():
        for leftover in folder.glob(f".{FILE_NAME}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _pairs(layout: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={layout.get(k)!r}" for k in keys)


# ---------------------------------------------------------------------------------------------- the file


def encode(state: SamplingState, fingerprint: Fingerprint, loop: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes: safetensors with the JSON header in its metadata."""
    tensors: dict[str, torch.Tensor] = {"latent": state.latent}
    solver_meta: dict[str, Any] = {}
    for key, value in state.solver.items():
        if isinstance(value, torch.Tensor):
            tensors[f"solver.{key}"], solver_meta[key] = value, {"tensor": True}
        elif isinstance(value, list):
            tensors.update({f"solver.{key}.{i}": t for i, t in enumerate(value)})
            solver_meta[key] = {"tensors": len(value)}
        else:
            solver_meta[key] = {"value": value}
    tensors.update({f"finished.{i}": t for i, t in enumerate(state.finished)})
    if state.rng is not None:
        tensors["rng"] = state.rng
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    header = {"format": FORMAT, "job": fingerprint.job, "model": fingerprint.model, "loop": loop,
              "clip": state.clip, "step": state.step, "expert": state.expert, "layout": state.layout,
              "solver": solver_meta, "finished": len(state.finished), "rng": state.rng is not None,
              "written_at": time.time()}
    header["sha256"] = content_digest(header, tensors)
    return save_tensors(tensors, metadata={HEADER_KEY: json.dumps(header)})


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a checkpoint file's bytes, or CheckpointUnreadable saying what is wrong."""
    if len(data) < 8:
        raise CheckpointUnreadable(f"{len(data)} bytes, shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise CheckpointUnreadable(f"truncated: the header needs {8 + size} bytes, the file has {len(data)}")
    try:
        table = json.loads(data[8 : 8 + size])
        end = 8 + size + max((v["data_offsets"][1] for k, v in table.items() if k != "__metadata__"), default=0)
        if end > len(data):
            raise CheckpointUnreadable(f"truncated: its tensors need {end} bytes, the file has {len(data)}")
        header = json.loads(table["__metadata__"][HEADER_KEY])
        tensors = load_tensors(data)
    except CheckpointUnreadable:
        raise
    except Exception as exc:  # garbage of any kind: safetensors, JSON and key errors alike
        raise CheckpointUnreadable(f"not a sampling checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointUnreadable("not a sampling checkpoint: its header is not a JSON object")
    return header, tensors


def content_digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the header (without its own "sha256") and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def mismatch(header: dict[str, Any], tensors: dict[str, torch.Tensor], fingerprint: Fingerprint,
             loop: dict[str, Any]) -> str | None:
    """Why this file may not continue this loop, or None if it may."""
    if header.get("format") != FORMAT:
        return f"format {header.get('format')!r}, this build reads {FORMAT!r}"
    if header.get("sha256") != content_digest(header, tensors):
        return "damaged: its contents do not match the checksum in its header"
    if header.get("job") != fingerprint.job:
        return (f"written for another job or other job parameters/inputs (job fingerprint {header.get('job')}, "
                f"this job {fingerprint.job})")
    if header.get("model") != fingerprint.model:
        return (f"written with another model or precision (model fingerprint {header.get('model')}, "
                f"this pool {fingerprint.model})")
    saved = header.get("loop") if isinstance(header.get("loop"), dict) else {}
    differ = sorted(k for k in set(saved) | set(loop) if saved.get(k) != loop.get(k))
    if differ:
        return "other sampling parameters: " + "; ".join(
            f"{k} {_short(saved.get(k))} there, {_short(loop.get(k))} now" for k in differ)
    return _structure_error(header, tensors, loop)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _structure_error(header: dict[str, Any], tensors: dict[str, torch.Tensor], loop: dict[str, Any]) -> str | None:
    clip, step, finished = header.get("clip"), header.get("step"), header.get("finished")
    if not (isinstance(clip, int) and 0 <= clip < loop["clips"] and isinstance(step, int)
            and 0 <= step <= loop["steps"] and finished == clip):
        return f"inconsistent: clip {clip!r}, step {step!r}, {finished!r} finished clips for {loop['clips']} clips"
    shape = loop["latent_shape"]
    latents = ["latent", *(f"finished.{i}" for i in range(clip))]
    wrong = [k for k in latents if k not in tensors or list(tensors[k].shape) != shape]
    if wrong:
        return f"inconsistent: {', '.join(wrong)} missing or not of the latent shape {shape}"
    return None


def to_state(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SamplingState:
    """The SamplingState of a verified file (CPU tensors)."""
    solver: SolverState = {}
    for key, entry in header["solver"].items():
        if entry.get("tensor"):
            solver[key] = tensors[f"solver.{key}"]
        elif "tensors" in entry:
            solver[key] = [tensors[f"solver.{key}.{i}"] for i in range(entry["tensors"])]
        else:
            solver[key] = entry.get("value")
    finished = [tensors[f"finished.{i}"] for i in range(header["finished"])]
    return SamplingState(clip=header["clip"], step=header["step"], latent=tensors["latent"], solver=solver,
                         expert=header.get("expert"), rng=tensors.get("rng") if header.get("rng") else None,
                         finished=finished, layout=header.get("layout") or {})


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the folder is
    finally:
        os.close(fd)
