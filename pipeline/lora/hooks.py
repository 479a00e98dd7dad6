"""Apply bound LoRAs unmerged: forward hooks add scale * B (A x) to each targeted Linear's output while the
handle lives, the weights untouched; remove() takes them away.

Must not leave anything behind: no hook, no fused-q/k/v delta, no changed weight after remove().

Reach: a hook sees a Linear only when it is called as a module. The fast path's fused q/k/v GEMM is reached
through FastSelfAttention.qkv_delta (the q/k/v module hooks stay too, for when the model runs unfused).
What no hook reaches is merged instead, with merge.py's exact restore on remove(): the full-tensor diffs
(norms, biases, modulation: small), and pairs on the fp32-island Linears the DiT calls functionally
(FUNCTIONAL_LINEARS) or on non-Linear weights (patch embedding convs, the motion encoder's EqualLinears).
After the first forward a check fails loudly if some hook never ran (a model change that bypasses modules).

Compiled blocks run eagerly while the hooks live (eager=True): hooks that come and go per job would
otherwise make Dynamo recompile every block for each LoRA set. That costs the compile speed-up for the job:
one reason choose_method prefers merging for compiled pools (method.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lora.binding import BoundLora, FullDiff, LowRank
from pipeline.lora.errors import some
from pipeline.lora.merge import MergedLoras, PristineWeights, merge_changes
from pipeline.models.fast import FastSelfAttention

Tensor = torch.Tensor
# Linears that pipeline/models/dit.py runs through F.linear in fp32 (linear_fp32), never as a module call
FUNCTIONAL_LINEARS = frozenset({"time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"})


class _Delta:
    """x -> (x A^T) B^T for every LoRA of one Linear: ranks stacked, strength and alpha folded into B (fp32,
    then the weight's dtype)."""

    def __init__(self, changes: Sequence[LowRank], weight: Tensor) -> None:
        device = weight.device
        one = changes[0]
        if len(changes) == 1 and one.scale == 1.0 and all(
                t.device == device and t.dtype == weight.dtype for t in (one.down, one.up)):
            self.down, self.up = one.down, one.up  # a resident LoRA (relighting) is used as it is, not copied
        else:  # moved first, widened to fp32 there (the host does no conversion work)
            self.down = torch.cat([c.down.to(device).float() for c in changes]).to(weight.dtype)
            self.up = torch.cat([c.up.to(device).float() * c.scale for c in changes], dim=1).to(weight.dtype)
        self.out_features = int(self.up.shape[0])
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.down.device != x.device:  # the expert was moved (offloaded and back) since hooking
            self.down, self.up = self.down.to(x.device), self.up.to(x.device)
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)

    def hook(self, _module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output + self(args[0]).to(output.dtype)


class _FusedDelta:
    """The fused q/k/v GEMM's delta: [q, k, v] deltas side by side, zeros for a projection without LoRA."""

    def __init__(self, parts: Sequence[_Delta | None], widths: Sequence[int]) -> None:
        self.parts, self.widths = list(parts), list(widths)

    def __call__(self, x: Tensor) -> Tensor:
        pieces = [d(x) if d is not None else x.new_zeros(*x.shape[:-1], w)
                  for d, w in zip(self.parts, self.widths, strict=True)]  # fmt: skip
        return torch.cat(pieces, dim=-1)


class LoraHooks:
    """Live unmerged LoRAs on one model; remove() (or leaving the `with` block) undoes everything."""

    def __init__(self, model: nn.Module, store: PristineWeights, own_store: bool) -> None:
        self.model, self.store, self._own = model, store, own_store
        self.hooked: tuple[str, ...] = ()  # Linear modules with a low-rank hook
        self.merged: MergedLoras | None = None  # what no hook reaches
        self._handles: list[Any] = []
        self._fused: list[FastSelfAttention] = []
        self._stack = ExitStack()
        self.removed = False

    @property
    def merged_params(self) -> tuple[str, ...]:
        return self.merged.touched if self.merged is not None else ()

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        try:
            for handle in self._handles:
                handle.remove()
            for attn in self._fused:  # back to the class default: no trace for guards of compiled blocks
                attn.__dict__.pop("qkv_delta", None)
            if self.merged is not None:
                self.merged.restore()
                if self._own:
                    self.store.release()
        finally:
            self._stack.close()

    def __enter__(self) -> LoraHooks:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


def hook_loras(model: nn.Module, loras: Sequence[BoundLora], *, eager: bool = True,
               pristine: PristineWeights | None = None) -> LoraHooks:  # fmt: skip
    """Put `loras` (bound to this model) on it unmerged; returns the live handle.

    eager: run compiled blocks eagerly until remove() (see the module docstring; pass False when the caller
    holds that stance itself, e.g. for several experts). pristine: the store for what gets merged (None =
    copies beside each weight, dropped at remove())."""
    store = pristine if pristine is not None else PristineWeights(device=None)
    handle = LoraHooks(model, store, own_store=pristine is None)
    try:
        hooked, leftovers = _split(model, loras)
        if leftovers:
            handle.merged = merge_changes(model, leftovers, store)
        modules = dict(model.named_modules())
        deltas = {name: _Delta(changes, modules[name].weight) for name, changes in hooked.items()}
        for name, delta in deltas.items():
            handle._handles.append(modules[name].register_forward_hook(delta.hook))
        handle.hooked = tuple(deltas)
        _reach_fused_qkv(modules, deltas, handle)
        handle._handles.append(_check_after_first_forward(model, deltas))
        if eager:
            handle._stack.enter_context(torch.compiler.set_stance("force_eager"))
    except BaseException:
        handle.remove()
        raise
    return handle


def _split(model: nn.Module, loras: Sequence[BoundLora]) -> tuple[dict[str, list[LowRank]], list[LowRank | FullDiff]]:
    """(Linear module -> its low-rank changes) for what hooks reach, and the changes to merge instead."""
    modules = dict(model.named_modules())
    hooked: dict[str, list[LowRank]] = {}
    leftovers: list[LowRank | FullDiff] = [d for lora in loras for d in lora.diffs]
    for change in (c for lora in loras for c in lora.low_rank):
        layer = modules.get(change.module)
        if isinstance(layer, nn.Linear) and change.module not in FUNCTIONAL_LINEARS:
            hooked.setdefault(change.module, []).append(change)
        else:
            leftovers.append(change)
    return hooked, leftovers


def _reach_fused_qkv(modules: dict[str, nn.Module], deltas: dict[str, _Delta], handle: LoraHooks) -> None:
    for name, attn in modules.items():
        if not isinstance(attn, FastSelfAttention):
            continue
        parts = [deltas.get(f"{name}.{p}" if name else p) for p in ("q", "k", "v")]
        if not any(parts):
            continue
        if attn.qkv_delta is not None:
            raise RuntimeError(f"{name}: unmerged LoRAs are already on this model's q/k/v; remove them first")
        attn.qkv_delta = _FusedDelta(parts, [attn.q.out_features, attn.k.out_features, attn.v.out_features])
        handle._fused.append(attn)


def _check_after_first_forward(model: nn.Module, deltas: dict[str, _Delta]) -> Any:
    """A forward hook on the model that, once, fails if a LoRA hook never ran (its layer was bypassed)."""
    handle: Any = None

    def check(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        handle.remove()
        missing = sorted(name for name, delta in deltas.items() if delta.calls == 0)
        if missing:
            raise RuntimeError(f"unmerged LoRA: the hooks on {some(missing)} never ran in a forward; these Linears "
                               f"are not called as modules, so their LoRA would be skipped (add them to "
                               f"pipeline.lora.hooks.FUNCTIONAL_LINEARS to have them merged)")

    handle = model.register_forward_hook(check)
    return handle
