"""Check a LoRA file against one model and turn it into weight changes: every key must name a weight of the
model with a fitting shape, or nothing is bound and the LoraError lists what does not fit.

Must not change the model: merge.py and hooks.py apply what is bound here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.lora.errors import some
from pipeline.lora.files import LoraFile
from pipeline.lora.keys import KeyRef, Part

Tensor = torch.Tensor
# Wan2.1 I2V's (and Animate's) image conditioning, in our dotted or kohya's underscored names
IMAGE_ATTENTION = re.compile(r"(^|[._])(k_img|v_img|norm_k_img)($|[._])|(^|[._])img_emb($|[._])")


@dataclass(frozen=True)
class LowRank:
    """W += scale * (up @ down), scale = strength * alpha / rank (or PEFT's rule); conv kernels flattened."""

    module: str
    param: str
    down: Tensor  # [rank, prod(W.shape[1:])]
    up: Tensor  # [W.shape[0], rank]
    scale: float
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, device: torch.device) -> Tensor:
        """The fp32 change of the weight (full precision: no TF32, see merge.py)."""
        up, down = (t.to(device).float() for t in (self.up, self.down))
        return (up @ down).mul_(self.scale).view(self.shape)


@dataclass(frozen=True)
class FullDiff:
    """W += scale * diff: `.diff`/`.diff_b`/`.diff_m` (scale = strength) or PEFT's lora_B.bias (pair's scale)."""

    param: str
    diff: Tensor
    scale: float

    def delta(self, device: torch.device) -> Tensor:
        return self.diff.to(device).float() * self.scale


@dataclass(frozen=True)
class BoundLora:
    """One LoRA file checked against one model at one strength: the weight changes it makes."""

    file: LoraFile
    strength: float
    low_rank: tuple[LowRank, ...]
    diffs: tuple[FullDiff, ...]
    touched: Mapping[str, int]  # parameter name -> its size in bytes (for the pristine copy's budget)
    ignored: tuple[str, ...] = ()  # keys dropped on request (image attention the model does not have)

    @property
    def changes(self) -> tuple[LowRank | FullDiff, ...]:
        return (*self.low_rank, *self.diffs)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BoundLora:
        """The same changes with their tensors on `device` (floats cast to `dtype`), for a LoRA kept resident
        between jobs; the file's own tensors are dropped (what the changes need is in them)."""
        move = lambda t: t.to(device, dtype) if dtype is not None else t.to(device)  # noqa: E731
        low_rank = tuple(replace(c, down=move(c.down), up=move(c.up)) for c in self.low_rank)
        diffs = tuple(replace(d, diff=move(d.diff)) for d in self.diffs)
        return replace(self, file=replace(self.file, tensors={}), low_rank=low_rank, diffs=diffs)


def bind_lora(lora: LoraFile, model: nn.Module, strength: float = 1.0, *,
              ignore_absent_image_attention: bool = False) -> BoundLora:  # fmt: skip
    """Validate every key of `lora` against `model`'s parameters; raises LoraError (nothing applied) with the
    unmapped keys and every shape or rank mismatch, each named by its key.

    ignore_absent_image_attention: drop (and list in .ignored) the keys for image cross-attention
    (k_img, v_img, norm_k_img, img_emb) when the model has none at all, as Wan2.2 I2V: they could change
    nothing. lightx2v's Wan2.2 I2V distillation LoRAs and every Wan2.1 I2V LoRA carry them; strict by default."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise lora.error(f"strength {strength!r}: expected a finite number, e.g. 1.0")
    binder = _Binder(lora, model, float(strength), ignore_absent_image_attention)
    low_rank, diffs = binder.bind()
    if binder.unmapped or binder.mismatched:
        raise lora.error(binder.report())
    params = dict(model.named_parameters())
    touched = {c.param: params[c.param].numel() * params[c.param].element_size() for c in (*low_rank, *diffs)}
    return BoundLora(lora, float(strength), tuple(low_rank), tuple(diffs), touched, tuple(binder.ignored))


def kohya_names(param_names: Iterable[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """kohya's underscored name -> our dotted module or parameter name (every prefix of a parameter name is
    a module), and the underscored names two of ours share, which a kohya key cannot tell apart."""
    names: dict[str, set[str]] = {}
    for param in param_names:
        parts = param.split(".")
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            names.setdefault(dotted.replace(".", "_"), set()).add(dotted)
    unique = {k: next(iter(v)) for k, v in names.items() if len(v) == 1}
    return unique, {k: sorted(v) for k, v in names.items() if len(v) > 1}


class _Binder:
    """Groups the file's keys by module, resolves each group to parameters, and collects what does not fit."""

    def __init__(self, lora: LoraFile, model: nn.Module, strength: float, ignore_image: bool) -> None:
        self.lora, self.strength = lora, strength
        self.params = {n: p for n, p in model.named_parameters()}
        self.model_name = type(model).__name__
        self.no_image_attention = not any(IMAGE_ATTENTION.search(n) for n in self.params)
        self.ignore_image = ignore_image and self.no_image_attention
        self.unmapped: list[str] = []
        self.mismatched: list[str] = []
        self.ignored: list[str] = []

    def bind(self) -> tuple[list[LowRank], list[FullDiff]]:
        low_rank: list[LowRank] = []
        diffs: list[FullDiff] = []
        for module, parts in self._groups().items():
            pair = self._pair(module, parts)
            if pair is not None:
                low_rank.append(pair)
            for part in (Part.DIFF, Part.DIFF_B, Part.DIFF_M, Part.UP_BIAS):
                if part in parts:
                    diff = self._diff(module, part, parts, pair)
                    diffs += [diff] if diff is not None else []
        return low_rank, diffs

    def report(self) -> str:
        problems = []
        if self.unmapped:
            problems.append(f"{len(self.unmapped)} keys map to no weight of {self.model_name}: {some(self.unmapped)}")
        if self.mismatched:
            problems.append(f"{len(self.mismatched)} tensors do not fit the model: {some(self.mismatched)}")
        if self.no_image_attention and any(IMAGE_ATTENTION.search(u.split(" ")[0]) for u in self.unmapped):
            problems.append("the k_img/v_img/norm_k_img/img_emb keys are for image cross-attention, which this model "
                            "does not have (Wan2.2 I2V; the LoRA was made with Wan2.1 I2V's modules, as lightx2v's "
                            "distillation LoRAs are): bind with ignore_absent_image_attention=True to drop them")
        return "; ".join(problems) + "; nothing was applied"

    # -- grouping ----------------------------------------------------------------------------------------

    def _groups(self) -> dict[str, dict[Part, KeyRef]]:
        groups: dict[str, dict[Part, KeyRef]] = {}
        kohya = kohya_names(self.params) if any(r.underscored for r in self.lora.refs) else None
        for ref in self.lora.refs:
            module = ref.module
            if self.ignore_image and IMAGE_ATTENTION.search(module):
                self.ignored.append(ref.key)
                continue
            if ref.underscored:
                assert kohya is not None
                unique, shared = kohya
                if module in shared:
                    self.unmapped.append(f"{ref.key} (ambiguous: {' or '.join(shared[module])})")
                    continue
                if module not in unique:
                    self.unmapped.append(f"{ref.key} (no module {module!r})")
                    continue
                module = unique[module]
            seen = groups.setdefault(module, {})
            if ref.part in seen:
                self.mismatched.append(f"{ref.key} and {seen[ref.part].key} both give {module} its {ref.part.value}")
                continue
            seen[ref.part] = ref
        return groups

    # -- low-rank pairs ----------------------------------------------------------------------------------

    def _pair(self, module: str, parts: dict[Part, KeyRef]) -> LowRank | None:
        down, up = parts.get(Part.DOWN), parts.get(Part.UP)
        if down is None and up is None:
            if Part.ALPHA in parts:
                self.unmapped.append(f"{parts[Part.ALPHA].key} (an alpha without lora_down/lora_up)")
            return None
        if down is None or up is None:
            have = down or up
            assert have is not None
            self.mismatched.append(f"{have.key}: its {'lora_up' if up is None else 'lora_down'} partner is missing")
            return None
        param = self._param(f"{module}.weight", down, up)
        if param is None:
            return None
        a, b = self.lora.tensors[down.key], self.lora.tensors[up.key]
        if not self._pair_fits(down, up, a, b, param):
            return None
        rank = a.shape[0]
        scale = self.strength * self._alpha_scale(down, parts.get(Part.ALPHA), rank)
        return LowRank(module, param, a.flatten(1), b.flatten(1), scale, tuple(self.params[param].shape))

    def _pair_fits(self, down: KeyRef, up: KeyRef, a: Tensor, b: Tensor, param: str) -> bool:
        w = self.params[param]
        if a.dim() < 2 or b.dim() < 2 or w.dim() < 2:
            self.mismatched.append(f"{down.key} {list(a.shape)} / {up.key} {list(b.shape)}: a LoRA pair needs 2-D "
                                   f"(or conv) tensors and a weight of 2 or more dims; {param} is {list(w.shape)}")
            return False
        if b.shape[1] != a.shape[0]:
            self.mismatched.append(f"{down.key} {list(a.shape)} / {up.key} {list(b.shape)}: ranks {a.shape[0]} and "
                                   f"{b.shape[1]} differ (lora_down [rank, in], lora_up [out, rank])")
            return False
        fan_in = math.prod(w.shape[1:])
        if a[0].numel() != fan_in or b.shape[0] != w.shape[0] or b[0, 0].numel() != 1:
            self.mismatched.append(f"{down.key} {list(a.shape)} / {up.key} {list(b.shape)}: expected lora_down "
                                   f"[{a.shape[0]}, {fan_in}] and lora_up [{w.shape[0]}, {a.shape[0]}] for {param} "
                                   f"{list(w.shape)} (a LoRA made for another model size?)")
            return False
        return True

    def _alpha_scale(self, down: KeyRef, alpha: KeyRef | None, rank: int) -> float:
        if alpha is None:
            return self.lora.scaling.scale(down.file_module, rank)
        value = self.lora.tensors[alpha.key]
        if value.numel() != 1:
            self.mismatched.append(f"{alpha.key}: alpha must be one number, has shape {list(value.shape)}")
            return 1.0
        return float(value.item()) / rank

    # -- full tensors ------------------------------------------------------------------------------------

    def _diff(self, module: str, part: Part, parts: dict[Part, KeyRef], pair: LowRank | None) -> FullDiff | None:
        ref = parts[part]
        if part is Part.UP_BIAS:
            if Part.UP not in parts:
                self.unmapped.append(f"{ref.key} (a lora_B bias without its lora_A/lora_B pair)")
                return None
            if pair is None:  # the pair's own error is reported already
                return None
            scale = pair.scale
        else:
            scale = self.strength
        param = self._param(self._diff_target(module, part), ref)
        if param is None:
            return None
        diff, shape = self.lora.tensors[ref.key], tuple(self.params[param].shape)
        if tuple(diff.shape) != shape:
            self.mismatched.append(f"{ref.key}: shape {list(diff.shape)}, expected {list(shape)} for {param} "
                                   f"(a LoRA made for another model size?)")
            return None
        return FullDiff(param, diff, scale)

    def _diff_target(self, module: str, part: Part) -> str:
        if part in (Part.DIFF_B, Part.UP_BIAS):
            return f"{module}.bias"
        if part is Part.DIFF_M:
            return f"{module}.modulation"
        # `.diff` changes a module's weight, or a parameter named directly (blocks.0.modulation.diff)
        return f"{module}.weight" if f"{module}.weight" in self.params else module

    def _param(self, name: str, *refs: KeyRef) -> str | None:
        if name in self.params:
            return name
        self.unmapped += [f"{ref.key} (no parameter {name!r})" for ref in refs]
        return None
