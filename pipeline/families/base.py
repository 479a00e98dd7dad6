"""What every pool family shares: its contract, the failures it raises, placement helpers and the load fingerprint.

A family (one module per kind: pipeline/families/<kind>.py, named by the kind's registry entry) loads a model once
across the ranks and turns resolved jobs into videos; it decides placement (Ulysses / CFG-parallel groups,
replication or FSDP, T5 on rank 0) and nothing else: the math is the pipelines', the socket and the mp4 the worker's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from inbox_schema import Job, kind_for_model
from inbox_schema.kinds import resolve
from pipeline.parallel.cfg import CfgParallel, ParallelPlan
from pipeline.parallel.ulysses import UlyssesParallel

# the pipelines' progress phases -> the protocol's
PHASE_NAMES = {"encoding": "encode", "sampling": "sampling", "decoding": "decode"}


class Reporter(Protocol):
    def progress(self, phase: str, step: int = 0, total: int = 0) -> None: ...


class JobCancelled(Exception):
    """The supervisor cancelled the running job; raised at a step boundary on every rank at once."""


class PoolShutdown(JobCancelled):
    """The supervisor asked the pool to stop (or went away) while a job was running."""


class JobFailure(Exception):
    """A job failure whose kind and retryability are known (the worker reports them as they are)."""

    kind = "internal"
    retryable = True


class JobInputError(JobFailure, ValueError):
    """A `run` command whose params or inputs the pipeline cannot use; names the field and the value."""

    kind = "input"
    retryable = False


def dtype_name(args: argparse.Namespace) -> str:
    """The pool's compute dtype: --dtype, else bf16 on the GPU and fp32 on the CPU."""
    return args.dtype or ("bf16" if args.device == "cuda" else "fp32")


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if dtype_name(args) == "bf16" else torch.float32


def precision_of(args: argparse.Namespace) -> str:
    """What made the video's numbers, for the sidecar: fp8 (with or without 8-bit attention), or the dtype."""
    if args.precision == "fp8":
        return "fp8+fp8-attention" if args.fp8_attention else "fp8"
    return dtype_name(args)


def speed_up(experts: list[torch.nn.Module], args: argparse.Namespace, fuse_qkv: bool) -> bool:
    """The fast path of pipeline.models.fast on loaded DiTs: fused q/k/v and regional compile (same function).

    fuse_qkv is off where the q/k/v layers must stay separate (FSDP shards them; a resident LoRA hooks them);
    compile stays off on the CPU (tests, the demo), where compiling would cost more than it saves.
    Precision fp8 (--precision) converts the block Linears first, on this rank's device (pipeline.models.fp8).
    """
    from pipeline.models.fast import optimize
    from pipeline.models.fp8 import apply_precision

    mode = getattr(args, "compile", "auto")
    compile_blocks = mode == "on" or (mode == "auto" and args.device == "cuda")
    for expert in experts:
        apply_precision(expert, getattr(args, "precision", "bf16"), device=torch.device(args.device),
                        fp8_attention=getattr(args, "fp8_attention", False))
        optimize(expert, compile=compile_blocks, fuse_qkv=fuse_qkv)
    return compile_blocks


def lora_options(args: argparse.Namespace, ranks: Any) -> dict[str, Any]:
    """PoolLoras' settings on this rank: the worker flags (method, read cache), rank 0's choice of methods shared
    with every rank, and how many of the pool's processes share this host's memory."""
    share = None
    if ranks.world_size > 1:
        def share(methods: dict[str, Any]) -> dict[str, Any]:
            box = [methods]
            dist.broadcast_object_list(box, src=0, group=ranks.control)
            return box[0]
    return {"method": getattr(args, "lora_method", "auto"),
            "cache_bytes": int(getattr(args, "lora_cache_mb", 4096)) << 20, "master": ranks.master, "share": share,
            "local_ranks": int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))}


def lora_stats(run: Any) -> dict[str, Any]:
    """What a job's LoRAs add to the family's result (the worker copies it into `done` stats for the sidecar)."""
    return {"loras": run.describe(), "lora_switch_seconds": run.switch_seconds()}


def broadcast_prompts(ranks: Any, encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 runs on rank 0 only (its ~11 GB stay off the other GPUs); the embeddings go to every rank."""
    pair: list[Any] = [None]
    if ranks.master:
        context, context_null = encode()
        pair = [(context.cpu(), context_null.cpu())]
    dist.broadcast_object_list(pair, src=0, group=ranks.control)
    context, context_null = pair[0]
    return context.to(ranks.device), context_null.to(ranks.device)


HASHED_MAX_BYTES = 64 * 2**20  # configs, indexes, tokenizers: hashed; multi-GB weight shards: size + mtime


def fingerprint(root: Path) -> dict[str, str]:
    """What the pool loaded, per file under the checkpoint dir: sha256 of small files, size and mtime of big ones.

    Cheap enough to compute at every pool start; `wanbox models verify --deep` hashes the shards themselves.
    """
    files: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        if info.st_size <= HASHED_MAX_BYTES:
            files[str(path.relative_to(root))] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            files[str(path.relative_to(root))] = f"size:{info.st_size} mtime:{int(info.st_mtime)}"
    return files


def parallel_groups(plan: ParallelPlan) -> tuple[Any, Any]:
    """(sp, guidance) for a plan: CFG halves with Ulysses inside, plain Ulysses, or nothing on one rank."""
    if plan.cfg == 2:
        cfg = CfgParallel()
        return cfg.sp, cfg
    if plan.ulysses > 1:
        return UlyssesParallel(), None
    return None, None


class Family(Protocol):
    """A model family as the worker drives it: planned by the constructor, loaded once, then one job per `run`.

    `run` returns the video as `result["video"]`, which the worker then writes; a family whose class sets
    `streams_video = True` is also passed `video_out` (a pipeline.video.VideoOutput, on rank 0) and may write its
    frames there as it decodes them instead (result["video"] None), so that the mp4 encodes meanwhile.
    """

    kind: str
    args: argparse.Namespace  # the worker's flags
    ranks: Any  # pipeline.worker.Ranks
    parallel: dict[str, Any]
    checkpoints: dict[str, str]

    def load(self) -> None: ...

    def run(self, job: Job, inputs: dict[str, str], report: Reporter, should_cancel: Callable[[], bool],
            checkpoint: Any = None) -> dict[str, Any]: ...


def open_family(args: argparse.Namespace, ranks: Any) -> Family:
    """The family of `--model` (from its kind's registry entry), planned (groups, sharding) but not loaded yet."""
    family_class = resolve(kind_for_model(args.model).family)
    return family_class(args, ranks)


def seed_of(job: Job) -> int:
    """The job's seed, which acceptance fixed: a job without one never reaches the pool."""
    if job.seed is None:
        raise JobInputError("params.sampling.seed: missing (a seed is drawn and recorded when the job is accepted)")
    return job.seed
