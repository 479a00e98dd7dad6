"""The pool's side of resuming: a `run` command's optional `resume` settings -> this rank's CheckpointStore.

Fingerprints the job (its parameters and the bytes of its input files) and the loaded model, and shares rank
0's verdict with the other ranks; it must not sample, and only rank 0 reads or writes the checkpoint file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from daemon import protocol
from pipeline.families.base import dtype_of
from pipeline.sampling.checkpoint import CheckpointPolicy, CheckpointStore, Fingerprint, digest


def checkpoint_store(run: protocol.Run, family: Any) -> CheckpointStore | None:
    """The store for this run on this rank, or None when the run asks for no (enabled) checkpoints.

    family: a loaded family (pipeline/families: its ranks, args, parallel plan, `checkpoints`)."""
    spec = run.resume
    if spec is None or not spec.enabled:
        return None
    policy = CheckpointPolicy(every_steps=spec.every_steps, every_seconds=spec.every_seconds, enabled=True)
    ranks = family.ranks
    fingerprint = Fingerprint(job_fingerprint(run), model_fingerprint(family)) if ranks.master else None
    return CheckpointStore(spec.dir, fingerprint, policy, layout=pool_layout(family), writer=ranks.master,
                           share=lambda value: from_rank0(ranks, value))


def job_fingerprint(run: protocol.Run) -> str:
    """The job as far as the video depends on it: kind, resolved parameters, and each input file's sha256
    (a re-prepared input that differs by one byte is another job). The job id and output path are not in
    it: a retry of the same job is the case this serves."""
    inputs = {role: file_sha256(Path(path)) for role, path in sorted(run.inputs.items())}
    params = run.params.to_dict()
    params.pop("name", None), params.pop("priority", None)  # they do not change the video
    return digest({"kind": run.kind, "params": params, "inputs": inputs})


def model_fingerprint(family: Any) -> str:
    """The weights the pool loaded (per-file hashes or size+mtime, computed at load on rank 0) and the
    precision they run in: another precision is another computation."""
    args = family.args
    return digest({"model": args.model, "files": getattr(family, "checkpoints", {}),
                   "dtype": str(dtype_of(args)), "precision": getattr(args, "precision", "bf16")})


def pool_layout(family: Any) -> dict[str, Any]:
    """What the result's rounding depends on beyond the math: a resume on a different layout is allowed, but
    is bitwise equal to neither layout's uninterrupted run."""
    from pipeline.models import attention

    ranks, args = family.ranks, family.args
    layout = {**family.parallel, "device": ranks.device.type, "dtype": str(dtype_of(args)),
              "attention": attention.active_backend(), "compile": getattr(args, "compile", "auto"),
              "torch": torch.__version__}
    if ranks.device.type == "cuda":
        layout["gpu"] = torch.cuda.get_device_name(ranks.device)
    if ranks.device.type == "cpu":  # CPU matmuls may split differently with another thread count
        layout["threads"] = torch.get_num_threads()
    return layout


def file_sha256(path: Path) -> str:
    if not path.is_file():
        return "missing"  # the pipeline then says which input is missing, as without resume
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def from_rank0(ranks: Any, value: Any) -> Any:
    """Rank 0's value on every rank (over the gloo control group; the checkpoint's tensors are on the CPU)."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=ranks.control)
    return box[0]


def run_stats(store: CheckpointStore | None) -> dict[str, Any]:
    """The family result's extra stats for `done`: {"stats": {"resumed_from": ..., "checkpoint": ...}}."""
    return {"stats": store.stats()} if store is not None else {}
