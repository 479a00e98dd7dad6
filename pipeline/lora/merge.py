"""Merge bound LoRAs into a resident model's weights, W <- W + sum(scale * B @ A) + sum(scale * diff) computed
in fp32 and rounded once, and restore the weights bit for bit afterwards.

Must not restore by subtracting (rounding makes W + d - d differ from W) nor reload the model from disk.

Exact restore: before a parameter is first changed, a copy of it is kept (`PristineWeights`), and restoring
copies it back in place. Kept copies stay valid for later jobs (the base weights never change), so a pool that
passes one store per expert pays the copy once; later switches pay only the copy back. In place because the
fast path's fused q/k/v buffer, compiled blocks and offloaded experts all hold the parameters' storage.
Where the copy lives is the choice (`device`): host memory by default (a distillation LoRA touches ~28.6 GB
per 14B bf16 expert: pinned host memory restores it at PCIe speed, ~0.6 s; pageable memory several times
slower), or the GPU where it has room (a device-to-device copy, ~30 ms). Re-reading the checkpoint instead
would cost no memory but 57 GB of fp32 shards per expert at disk/page-cache speed, seconds per switch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import torch
from torch import nn

from pipeline.lora.binding import BoundLora, FullDiff, LowRank

Tensor = torch.Tensor
Change = LowRank | FullDiff


class PristineWeights:
    """Bit-exact copies of parameters taken before their first change; `restore` writes them back.

    device: where the copies live ("cpu", a CUDA device, or None = beside each parameter); pin_memory: page-
    locked host copies (fast, asynchronous copies to and from the GPU; only with device "cpu")."""

    def __init__(self, device: torch.device | str | None = "cpu", pin_memory: bool = False) -> None:
        self.device = None if device is None else torch.device(device)
        self.pin_memory = pin_memory and self.device is not None and self.device.type == "cpu"
        self._copies: dict[str, Tensor] = {}
        self._arena = _PinnedArena()
        self.changed: set[str] = set()  # merged and not yet restored

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    def __contains__(self, name: str) -> bool:
        return name in self._copies

    def keep(self, name: str, param: Tensor) -> None:
        """Copy `param` unless a copy is held already (then it is the same bits: every change is restored)."""
        if name in self._copies:
            return
        device = self.device or param.device
        if self.pin_memory and param.is_cuda:
            copy = self._arena.take(param.shape, param.dtype)
        else:
            copy = torch.empty(param.shape, dtype=param.dtype, device=device)
        copy.copy_(param.detach(), non_blocking=copy.is_pinned())
        self._copies[name] = copy

    def restore(self, name: str, param: Tensor) -> None:
        with torch.no_grad():
            param.copy_(self._copies[name], non_blocking=self._copies[name].is_pinned())
        self.changed.discard(name)

    def release(self) -> None:
        """Drop every copy (none may be needed: a changed parameter without its copy could never be restored)."""
        if self.changed:
            raise RuntimeError(f"{len(self.changed)} parameters are still merged (e.g. {min(self.changed)}); restore "
                               f"them before releasing their pristine copies")
        self._copies.clear()
        self._arena = _PinnedArena()


class _PinnedArena:
    """Page-locked host memory in 1 GiB chunks, handed out as views: torch's pinned allocator rounds every
    request up to a power of two, which for ~1200 weights of a 14B expert would pin up to twice their size."""

    CHUNK = 1 << 30
    ALIGN = 512

    def __init__(self) -> None:
        self.chunks: list[Tensor] = []
        self.used = self.CHUNK  # no chunk yet

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.CHUNK:  # a weight larger than a chunk gets its own block
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if self.used + nbytes > self.CHUNK:
            self.chunks.append(torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True))
            self.used = 0
        start = self.used
        self.used = -(-(start + nbytes) // self.ALIGN) * self.ALIGN
        return self.chunks[-1][start : start + nbytes].view(dtype).view(shape)


class MergedLoras:
    """What merge_loras changed; restore() puts back the exact pre-merge weights (idempotent)."""

    def __init__(self, model: nn.Module, touched: Sequence[str], store: PristineWeights, own_store: bool) -> None:
        self.model, self.touched, self.store, self._own = model, tuple(touched), store, own_store
        self.restored = False

    def restore(self) -> None:
        if self.restored:
            return
        params = dict(self.model.named_parameters())  # by name: a reload may have replaced the objects
        for name in self.touched:
            self.store.restore(name, params[name])
        _sync(self.store)
        self.restored = True
        if self._own:
            self.store.release()

    def __enter__(self) -> MergedLoras:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()


def merge_loras(model: nn.Module, loras: Sequence[BoundLora], pristine: PristineWeights | None = None) -> MergedLoras:
    """Merge `loras` (bound to this model or one of the same shapes) into its weights in place.

    pristine: the store that keeps the exact weights (pass one per model to keep copies across jobs);
    None = a private host-memory store, released at restore(). On any error the merged part is restored."""
    changes = [c for lora in loras for c in lora.changes]
    return merge_changes(model, changes, pristine)


def merge_changes(model: nn.Module, changes: Sequence[Change], pristine: PristineWeights | None) -> MergedLoras:
    """merge_loras for individual changes (hooks.py merges what its hooks cannot reach through this)."""
    store = pristine if pristine is not None else PristineWeights("cpu")
    by_param: dict[str, list[Change]] = {}
    for change in changes:
        by_param.setdefault(change.param, []).append(change)
    params = dict(model.named_parameters())
    _check(params, by_param, store)
    merged = MergedLoras(model, list(by_param), store, pristine is None)
    done: list[str] = []
    try:
        with torch.no_grad(), _full_fp32_matmul():
            for name, group in by_param.items():
                param = params[name]
                delta = sum((c.delta(param.device) for c in group[1:]), group[0].delta(param.device))
                store.keep(name, param)
                store.changed.add(name)
                done.append(name)
                param.copy_(param.float() + delta)  # fp32 sum, one rounding to the weight's dtype
        _sync(store)
    except BaseException:
        MergedLoras(model, done, store, pristine is None).restore()
        raise
    return merged


def _check(params: dict[str, nn.Parameter], by_param: dict[str, list[Change]], store: PristineWeights) -> None:
    for name, group in by_param.items():
        param = params.get(name)
        if param is None:
            raise ValueError(f"merge: the model has no parameter {name!r} (bound to another model?)")
        shape = group[0].shape if isinstance(group[0], LowRank) else tuple(group[0].diff.shape)
        if tuple(param.shape) != shape or type(param.data) is not torch.Tensor or param.is_meta:
            raise ValueError(f"merge: parameter {name} is {type(param.data).__name__} {list(param.shape)}; expected "
                             f"a plain materialised tensor {list(shape)} (sharded or meta weights cannot be merged: "
                             f"use the unmerged hooks)")
        if name in store.changed:
            raise RuntimeError(f"merge: {name} is already merged and not restored; restore the earlier merge first")


@contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """B @ A in true fp32 even where the process allows TF32 (10-bit mantissa) for speed."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _sync(store: PristineWeights) -> None:
    """Asynchronous copies to/from pinned memory must land before anyone reads or frees the buffers."""
    if store.pin_memory and torch.cuda.is_available():
        torch.cuda.synchronize()
