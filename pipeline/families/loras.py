"""A warm pool's per-job LoRAs: read and check a job's LoRA files on this rank (reads cached by sha256 across jobs),
put them on the resident models before sampling and take them off after, bit for bit, however the job ends.

Must not reload or replace base weights, nor keep a LoRA on a model between jobs; how a LoRA is read, bound, merged
or hooked is pipeline.lora's. One PristineWeights per model lives as long as the pool, so each weight is copied once.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from inbox_schema import Job
from inbox_schema.job import LIBRARY, LoraEntry
from inbox_schema.loras import library_problem
from pipeline.families.base import JobInputError
from pipeline.lora import (
    AppliedLoras,
    JobLoras,
    LoraError,
    LoraFile,
    LoraRequest,
    Method,
    PristineWeights,
    apply_loras,
    bind_requests,
    choose_method,
    read_lora,
)

METHODS = ("auto", Method.MERGED.value, Method.UNMERGED.value)
DEFAULT_CACHE_BYTES = 4 << 30  # LoRA files kept read per rank (a Lightning pair is ~1.3 GB)


@dataclass
class JobLoraRun:
    """One job's LoRAs on the pool: what was bound, how it went on, and how long switching took."""

    bound: JobLoras
    applied: AppliedLoras | None = None
    apply_seconds: float = 0.0
    remove_seconds: float = 0.0

    def remove(self) -> None:
        if self.applied is not None and not self.applied.removed:
            started = time.perf_counter()
            self.applied.remove()
            self.remove_seconds = round(time.perf_counter() - started, 4)

    def describe(self) -> list[dict[str, Any]]:
        """Per LoRA for the worker's `done` stats and the sidecar: file, sha256, strength, format, experts, method,
        weights changed and, where image-attention keys were dropped, which (block numbers as *) and how many."""
        assert self.applied is not None
        described = self.applied.describe()
        for item, (_request, bound) in zip(described, self.bound.entries, strict=True):
            ignored = {name: b.ignored for name, b in bound.items() if b.ignored}
            if ignored:
                keys = sorted({re.sub(r"\.\d+\.", ".*.", key) for found in ignored.values() for key in found})
                item["ignored_keys"] = {"count": {name: len(found) for name, found in ignored.items()}, "keys": keys,
                                        "why": "image cross-attention, which this model does not have"}
        return described

    def switch_seconds(self) -> dict[str, float]:
        return {"apply": self.apply_seconds, "remove": self.remove_seconds}


class PoolLoras:
    """The LoRA side of one family on one rank: `bind` before any work of a job, `apply` just before sampling,
    JobLoraRun.remove() right after it (in a `finally`)."""

    def __init__(self, models: Mapping[str, nn.Module], device: torch.device, *, compiled: bool, sharded: bool = False,
                 method: str = "auto", cache_bytes: int = DEFAULT_CACHE_BYTES, master: bool = True,
                 share: Callable[[dict[str, Method]], dict[str, Method]] | None = None, local_ranks: int = 1) -> None:
        """share: makes every rank use rank 0's choice of methods (a broadcast; None on a pool of one);
        local_ranks: the pool's processes on this host, whose pristine copies share its memory."""
        if method not in METHODS:
            raise ValueError(f"lora method: got {method!r}, expected one of {', '.join(METHODS)}")
        self.models, self.compiled, self.sharded, self.method = dict(models), compiled, sharded, method
        self.master, self.cache_bytes, self.share, self.local_ranks = master, cache_bytes, share, max(local_ranks, 1)
        # Pinned host copies on CUDA: restoring 28.6 GB per expert at PCIe speed (pipeline/lora/merge.py).
        self.pristine = {name: PristineWeights("cpu", pin_memory=device.type == "cuda") for name in self.models}
        self._files: OrderedDict[str, LoraFile] = OrderedDict()

    # --- before anything else of the job -------------------------------------------------------------

    def bind(self, job: Job) -> JobLoraRun | None:
        """Read (or take from the cache) and check every LoRA of `job` against the models it names; a LoRA that
        does not fit fails the job here, before any encoding or sampling, as an input error with the exact reason
        (file, format read as, keys). None for a job without LoRAs."""
        if not job.loras:
            return None
        requests = [LoraRequest(self._file(i, entry), entry.strength, entry.experts,
                                ignore_absent_image_attention=True) for i, entry in enumerate(job.loras)]
        try:
            bound = bind_requests(requests, self.models)
        except LoraError as exc:
            index = next(i for i, r in enumerate(requests) if str(r.file.path) == exc.file)
            raise JobInputError(f"lora[{index}]: {exc}") from exc
        self._warn_ignored(bound)
        return JobLoraRun(bound)

    def _file(self, index: int, entry: LoraEntry) -> LoraFile:
        where = f"lora[{index}]"
        if entry.path is None:
            raise JobInputError(f"{where}: {entry.file}: the job names no file path (accepted without a LoRA library?)")
        if entry.source == LIBRARY:  # checked at validation; again here, where the file is about to be read
            problem = library_problem(library_root(entry), entry.file)
            if problem:
                raise JobInputError(f"{where}.library = {entry.file!r}: expected {problem}")
        cached = self._files.get(entry.sha256 or "")
        if cached is not None:
            self._files.move_to_end(cached.sha256)
            return cached
        try:
            file = read_lora(entry.path)
        except LoraError as exc:
            raise JobInputError(f"{where}: {exc}") from exc
        if entry.sha256 is not None and file.sha256 != entry.sha256:
            raise JobInputError(f"{where}: {entry.path}: sha256 {file.sha256}, expected {entry.sha256} (the file "
                                f"changed after the job was accepted)")
        self._remember(file)
        return file

    def _remember(self, file: LoraFile) -> None:
        self._files[file.sha256] = file
        while len(self._files) > 1 and sum(map(file_bytes, self._files.values())) > self.cache_bytes:
            self._files.popitem(last=False)  # the least recently used file

    def _warn_ignored(self, bound: JobLoras) -> None:
        for request, per_model in bound.entries:
            dropped = {name: len(b.ignored) for name, b in per_model.items() if b.ignored}
            if dropped and self.master:
                print(f"worker: warning: {request.file.name}: dropped {dropped} image cross-attention keys "
                      f"(k_img/v_img/norm_k_img/img_emb), which this model does not have; listed in the sidecar",
                      file=sys.stderr)

    # --- around sampling ------------------------------------------------------------------------------

    def apply(self, run: JobLoraRun, forwards: Mapping[str, int], tokens: int) -> None:
        """Put the job's LoRAs on, per model merged or unmerged (choose_method, or the pool's --lora-method);
        `forwards` per model name and `tokens` per forward feed the cost rule."""
        methods = {name: self._method(name, run.bound, forwards.get(name, 0), tokens) for name in self.models}
        if self.share is not None:  # free memory differs a little from rank to rank: one decision for all
            methods = self.share(methods)
        started = time.perf_counter()
        try:
            run.applied = apply_loras(run.bound, self.models, methods, pristine=self.pristine)
        except ValueError as exc:  # e.g. FSDP-sharded weights that a full-tensor diff cannot be merged into
            raise JobInputError(f"LoRAs: {exc}") from exc
        run.apply_seconds = round(time.perf_counter() - started, 4)

    def _method(self, name: str, bound: JobLoras, forwards: int, tokens: int) -> Method:
        if self.method != "auto":
            return Method(self.method)
        if self.sharded:
            return Method.UNMERGED  # FSDP shards cannot be merged into
        # copies already kept count as free; every local rank keeps its own copies in the same host memory
        room = free_host_bytes() // self.local_ranks + self.pristine[name].nbytes
        return choose_method(bound.on(name), forwards=forwards, tokens=tokens, pristine_room_bytes=room,
                             compiled=self.compiled)


def library_root(entry: LoraEntry) -> Path:
    """The library a library entry's path lies in: the path without the entry's name."""
    assert entry.path is not None
    return Path(os.fspath(entry.path)).parents[len(PurePosixPath(entry.file).parts) - 1]


def file_bytes(file: LoraFile) -> int:
    return sum(t.numel() * t.element_size() for t in file.tensors.values())


def free_host_bytes() -> int:
    """Host memory available now (where the pristine copies live): MemAvailable, which counts the page cache the
    checkpoints left behind as reclaimable, unlike the free pages alone."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
