"""The DiTs' fast path on the GPU: `optimize(model)` fuses the self-attention q/k/v projection and compiles each
transformer block (regional torch.compile), in place, after loading.

Must not change the function the model computes, its state-dict keys, or its memory; nothing here may assume
one GPU (Ulysses attention stays eager, outside the compiled graphs) or a particular resolution.

What each part buys, predicted for one 14B forward on an H200 (measured baseline, bench/RESULTS.md: 720p
13.15 s eager, 11.43 s with the blocks compiled; 480p 3.65 s / 2.86 s). Measure with bench/bench_fast.py.
* Fused q/k/v: one [L, 5120] x [5120, 15360] GEMM instead of three [5120, 5120] ones reads x once instead of
  three times and gives cuBLAS a wider problem: ~2-4 % of the 0.6 PFLOP of q/k/v at 720p, i.e. 30-60 ms per
  forward (0.3-0.5 %); more at 480p where the GEMMs are smaller (~1 %).
* Attention as one opaque custom op (`wanbox::dit_attention`): the compiled block has no graph break and
  Dynamo does not trace the backend choice / self-test code; inductor fuses RMSNorm + RoPE + the bf16 cast
  of q and k into one kernel that reads the GEMM output once and writes bf16 q/k directly (eager writes fp32
  q/k, then a bf16 copy: 4 extra passes over 2 x 774 MB per block at 720p ≈ 2.5 ms per block, 0.1 s per
  forward; already inside the measured 11.43 s, kept here). Ulysses (`sp` given) calls its collectives in a `torch.compiler.disable`d function instead: one
  graph break per self-attention, no traced collective.
* Layout: torch's cuDNN path takes [B, L, H, D] rows as they come (its "unpacked" layout) and v as a view
  into the fused [L, 3*dim] output (its "packed QKV" layout), so q/k/v reach the kernel with no copy;
  attention_layout="bhld" (contiguous head-major) exists to measure the alternative, which torch may refuse
  for cuDNN (then the op copies: see dit_attention). bench_fast.py times all three layouts alone.
* Regional compile of the 40 blocks shares one compiled graph (same code, same shapes): the first call per
  resolution costs ~20 s, paid once per warm pool; the cache limit is raised so that a pool that serves many
  sizes keeps its compiled code instead of silently falling back to eager.
Together: 720p ~11.2-11.3 s, 480p ~2.75-2.8 s (from 11.43 / 2.86 s). The 720p target of 10.5 s is below what
cuDNN's 564 TFLOP/s attention allows (4.68 PFLOP of attention alone = 8.3 s); see the bench's kernel table.

Moving an optimized model (`.to()`, expert offload to host memory) moves the fused storage once and keeps
q/k/v as views of it. Anything that replaces the q/k/v parameters (load_state_dict(assign=True), FSDP
sharding) is detected before the next forward: the model then drops the fused copy and runs the plain
three-matmul path. Call optimize() after sharding with FSDP, or pass fuse_qkv=False.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.models import attention as attention_mod
from pipeline.models import fp8
from pipeline.models.dit import (
    CrossAttention,
    DiTBlock,
    Rope,
    SelfAttention,
    SequenceParallel,
    WanDiT,
    linear,
)
from pipeline.models.rope import apply_rope

log = logging.getLogger(__name__)
Tensor = torch.Tensor
LAYOUTS = ("blhd", "bhld")
COMPILE_CACHE_LIMIT = 64  # compiled variants per code object: resolutions x (I2V, Animate) x (sp, no sp)


# ---------------------------------------------------------------------------------------------- attention op


_strided_inputs_ok = True  # False once a kernel has refused q/k/v views (then they are copied first)


@torch.library.custom_op("wanbox::dit_attention", mutates_args=())
def dit_attention(q: Tensor, k: Tensor, v: Tensor, k_len: int) -> Tensor:
    """pipeline.models.attention.attention as one opaque op: [B, Lq, H, D] out, contiguous.

    The fused projection hands over v as a view into the [L, 3*dim] GEMM output (cuDNN's "packed QKV"
    value layout, which torch's cuDNN path accepts next to plain [B, L, H, D]); a kernel that refuses
    a layout gets contiguous copies instead, from then on (a warning says so)."""
    global _strided_inputs_ok
    if not _strided_inputs_ok:
        q, k, v = (t.contiguous() for t in (q, k, v))
    try:
        return attention_mod.attention(q, k, v, k_len).contiguous()
    except RuntimeError:
        if all(t.is_contiguous() for t in (q, k, v)):
            raise
        log.warning("attention kernel refused strided q/k/v (strides %s, %s, %s); copying them from now on",
                    q.stride(), k.stride(), v.stride())  # fmt: skip
        _strided_inputs_ok = False
        return attention_mod.attention(q.contiguous(), k.contiguous(), v.contiguous(), k_len).contiguous()


@dit_attention.register_fake
def _dit_attention_shape(q: Tensor, k: Tensor, v: Tensor, k_len: int) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.compiler.disable
def _sequence_parallel_attention(sp: SequenceParallel, q: Tensor, k: Tensor, v: Tensor, k_len: int) -> Tensor:
    # Collectives stay eager: a graph break here is cheaper and safer than tracing all_to_all.
    return sp.attention(q, k, v, k_len)


def _attend(q: Tensor, k: Tensor, v: Tensor, k_len: int, sp: SequenceParallel | None, layout: str) -> Tensor:
    if sp is not None:
        return _sequence_parallel_attention(sp, q, k, v, k_len)
    if layout == "bhld":  # same logical [B, L, H, D] tensors, stored head-major for the kernel
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return dit_attention(q, k, v, k_len)


# ---------------------------------------------------------------------------------------------- modules


class FastSelfAttention(SelfAttention):
    """SelfAttention whose q/k/v weights (and biases) are row blocks of one fused [3*dim, dim] buffer.

    With FP8 layers (pipeline.models.fp8.Fp8Linear) the weights are codes with one scale per row: the
    scales are fused the same way, so the fused GEMM computes exactly what the three layers do."""

    qkv_weight: Tensor | None
    qkv_bias: Tensor | None
    qkv_scale: Tensor | None  # FP8 only
    attention_layout: str = "blhd"
    # [B, L, dim] -> [B, L, 3*dim] added to the fused GEMM's output: unmerged LoRAs on q/k/v, which the
    # fused path would otherwise skip (set and cleared by pipeline/lora/hooks.py)
    qkv_delta: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor, rope: Rope, k_len: int, sp: SequenceParallel | None) -> Tensor:
        if self.qkv_weight is None:
            return self._forward_unfused(x, rope, k_len, sp)
        heads = (self.num_heads, -1)
        w = self.qkv_weight
        if self.qkv_scale is None:
            x = x.to(w.dtype)
            qkv = torch.nn.functional.linear(x, w, self.qkv_bias)  # [B, L, 3*dim], one GEMM
        else:  # FP8 codes with row scales (pipeline.models.fp8): x is quantized once for q, k and v
            dtype = self.q.compute_dtype  # the dtype the three layers take (as linear() casts for them)
            x = x.to(dtype)
            qkv = fp8.fp8_linear(x, w, self.qkv_scale, self.qkv_bias, dtype)
        if self.qkv_delta is not None:
            qkv = qkv + self.qkv_delta(x).to(qkv.dtype)
        q, k, v = qkv.chunk(3, dim=-1)
        v = v.unflatten(2, heads)
        q = self.rope(self.norm_q(q).unflatten(2, heads), rope).to(v.dtype)
        k = self.rope(self.norm_k(k).unflatten(2, heads), rope).to(v.dtype)
        out = _attend(q, k, v, k_len, sp, self.attention_layout)
        return linear(self.o, out.flatten(2))

    def _forward_unfused(self, x: Tensor, rope: Rope, k_len: int, sp: SequenceParallel | None) -> Tensor:
        heads = (self.num_heads, -1)
        v = linear(self.v, x).unflatten(2, heads)
        q = self.rope(self.norm_q(linear(self.q, x)).unflatten(2, heads), rope).to(v.dtype)
        k = self.rope(self.norm_k(linear(self.k, x)).unflatten(2, heads), rope).to(v.dtype)
        out = _attend(q, k, v, k_len, sp, self.attention_layout)
        return linear(self.o, out.flatten(2))

    @staticmethod
    def rope(x: Tensor, tables: Rope) -> Tensor:
        return apply_rope(x, *tables)

    # -- the fused storage ------------------------------------------------------------------------------

    def fuse(self) -> bool:
        """Move q/k/v weights and biases into one buffer each; False (nothing changed) when they cannot be."""
        layers = (self.q, self.k, self.v)
        params = [p for layer in layers for p in (layer.weight, layer.bias)]
        if any(p is None or type(p.data) is not torch.Tensor or p.is_meta for p in params):
            return False  # no bias, sharded (DTensor) or not materialised: keep the plain path
        if len({isinstance(layer, fp8.Fp8Linear) for layer in layers}) > 1:
            return False  # FP8 and dense layers mixed: nothing to fuse
        with torch.no_grad():
            fused = {name: torch.cat([getattr(layer, name) for layer in layers]) for name in _row_tensors(self.q)}
        for name, tensor in fused.items():
            self.register_buffer(_FUSED_NAMES[name], tensor, persistent=False)
        self._point_at_fused()
        return True

    def unfuse(self) -> None:
        """Give q/k/v their own storage again and drop the fused buffers."""
        if not self.fused_intact():  # nothing fused, or q/k/v already have storage of their own
            self.drop_fused()
            return
        for layer in (self.q, self.k, self.v):
            layer.weight.data = layer.weight.data.clone()
            layer.bias.data = layer.bias.data.clone()
            if isinstance(layer, fp8.Fp8Linear):
                layer.weight_scale = layer.weight_scale.clone()
        self.drop_fused()

    def fused_intact(self) -> bool:
        """True while q/k/v are still views into the fused buffers (nothing replaced them)."""
        if self.qkv_weight is None:
            return False
        for i, layer in enumerate((self.q, self.k, self.v)):
            if type(layer.weight.data) is not torch.Tensor or type(layer.bias.data) is not torch.Tensor:
                return False  # sharded (DTensor) since fusing
            rows = layer.weight.shape[0]
            if (
                layer.weight.data_ptr() != self.qkv_weight[i * rows].data_ptr()
                or layer.bias.data_ptr() != self.qkv_bias[i * rows :].data_ptr()
                or layer.weight.dtype != self.qkv_weight.dtype
                or isinstance(layer, fp8.Fp8Linear) != (self.qkv_scale is not None)
            ):
                return False
            if self.qkv_scale is not None and layer.weight_scale.data_ptr() != self.qkv_scale[i * rows].data_ptr():
                return False
        return True

    def drop_fused(self) -> None:
        self.qkv_weight = self.qkv_bias = self.qkv_scale = None

    def _point_at_fused(self) -> None:
        assert self.qkv_weight is not None and self.qkv_bias is not None
        weights, biases = self.qkv_weight.chunk(3), self.qkv_bias.chunk(3)
        scales = self.qkv_scale.chunk(3) if self.qkv_scale is not None else (None,) * 3
        for layer, w, b, s in zip((self.q, self.k, self.v), weights, biases, scales, strict=True):
            layer.weight.data, layer.bias.data = w, b
            if s is not None:
                layer.weight_scale = s

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:  # type: ignore[override]
        """.to()/.half()/...: convert the fused buffers once and re-point q/k/v at them (no second copy)."""
        if self.qkv_weight is None or not self.fused_intact():
            return super()._apply(fn, recurse)
        held = [
            (layer, layer._parameters.pop("weight"), layer._parameters.pop("bias"),
             layer._buffers.pop("weight_scale", None))
            for layer in (self.q, self.k, self.v)
        ]  # fmt: skip
        try:
            super()._apply(fn, recurse)
        finally:
            for layer, weight, bias, scale in held:
                layer._parameters["weight"], layer._parameters["bias"] = weight, bias
                if scale is not None:
                    layer._buffers["weight_scale"] = scale
        self._point_at_fused()
        return self


_FUSED_NAMES = {"weight": "qkv_weight", "bias": "qkv_bias", "weight_scale": "qkv_scale"}


def _row_tensors(layer: nn.Module) -> tuple[str, ...]:
    """The per-output-row tensors of a q/k/v layer that fusing concatenates."""
    return ("weight", "bias", "weight_scale") if isinstance(layer, fp8.Fp8Linear) else ("weight", "bias")


class FastCrossAttention(CrossAttention):
    """CrossAttention whose attention calls go through the opaque op (no Dynamo tracing of backend code)."""

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None = None) -> Tensor:
        heads = (self.num_heads, -1)
        v = linear(self.v, context).unflatten(2, heads)
        q = self.norm_q(linear(self.q, x)).unflatten(2, heads).to(v.dtype)
        k = self.norm_k(linear(self.k, context)).unflatten(2, heads).to(v.dtype)
        out = dit_attention(q, k, v, k.shape[1])
        if self.with_image:
            if image_context is None:
                raise ValueError("this block attends to image tokens: image_context is required")
            v_img = linear(self.v_img, image_context).unflatten(2, heads)
            k_img = self.norm_k_img(linear(self.k_img, image_context)).unflatten(2, heads).to(v_img.dtype)
            out = out + dit_attention(q, k_img, v_img, k_img.shape[1])
        return linear(self.o, out.flatten(2))


# ---------------------------------------------------------------------------------------------- entry point


def optimize(
    model: WanDiT,
    *,
    compile: bool = True,
    fuse_qkv: bool = True,
    attention_layout: str = "blhd",
    compile_mode: str | None = None,
) -> WanDiT:
    """Make a loaded WanDiT / WanAnimateDiT faster in place (same function, same keys); returns it.

    compile: regional torch.compile of every transformer block (dynamic=False; one compile per resolution,
    shared by the blocks). fuse_qkv: one q/k/v GEMM per self-attention. attention_layout: "blhd" (strided
    views, default) or "bhld" (contiguous head-major q/k/v for the kernel; only with compile pays off).
    compile_mode: passed to torch.compile (None = default; "max-autotune-no-cudagraphs" tunes GEMMs, slow).
    """
    if not isinstance(model, WanDiT):
        raise TypeError(f"optimize() takes a WanDiT or WanAnimateDiT, got {type(model).__name__}")
    if attention_layout not in LAYOUTS:
        raise ValueError(f"attention_layout {attention_layout!r}: expected one of {', '.join(LAYOUTS)}")
    fused = 0
    for block in model.blocks:
        fused += _speed_up_block(block, fuse_qkv, attention_layout)
    if fuse_qkv and fused < len(model.blocks):
        log.warning("q/k/v fused in %d of %d blocks (the others are sharded, bias-free or on meta)",
                    fused, len(model.blocks))  # fmt: skip
    if not getattr(model, "_fast_check_registered", False):
        model.register_forward_pre_hook(_check_fused_views)
        model._fast_check_registered = True  # type: ignore[assignment]
    if compile:
        _raise_compile_cache_limit()
        for block in model.blocks:
            block.compile(dynamic=False, mode=compile_mode)
    else:  # undo an earlier optimize(compile=True)
        for block in model.blocks:
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None
    return model


def fused_blocks(model: WanDiT) -> int:
    """How many blocks currently run their self-attention q/k/v as one GEMM."""
    return sum(
        1 for b in model.blocks if isinstance(b.self_attn, FastSelfAttention) and b.self_attn.fused_intact()
    )


def _speed_up_block(block: DiTBlock, fuse_qkv: bool, layout: str) -> bool:
    attn = block.self_attn
    if not isinstance(attn, FastSelfAttention):
        attn.__class__ = FastSelfAttention  # same parameters and keys, new forward
        attn.register_buffer("qkv_weight", None, persistent=False)
        attn.register_buffer("qkv_bias", None, persistent=False)
        attn.register_buffer("qkv_scale", None, persistent=False)
    if not isinstance(block.cross_attn, FastCrossAttention):
        block.cross_attn.__class__ = FastCrossAttention
    attn.attention_layout = layout
    if not fuse_qkv:
        attn.unfuse()
        return False
    return attn.fused_intact() or attn.fuse()


def _check_fused_views(model: nn.Module, args: Any) -> None:
    """Before each forward: a block whose q/k/v were replaced drops its stale fused copy (plain path)."""
    for block in model.blocks:  # type: ignore[union-attr]
        attn = block.self_attn
        if isinstance(attn, FastSelfAttention) and attn.qkv_weight is not None and not attn.fused_intact():
            log.warning("self-attention q/k/v were replaced after optimize(); dropping the fused copy")
            attn.drop_fused()


def _raise_compile_cache_limit() -> None:
    """Dynamo falls back to eager after 8 compiled variants of one code object; a warm pool may need more."""
    wanted = {"recompile_limit": COMPILE_CACHE_LIMIT, "cache_size_limit": COMPILE_CACHE_LIMIT,
              "accumulated_recompile_limit": 8 * COMPILE_CACHE_LIMIT,
              "accumulated_cache_size_limit": 8 * COMPILE_CACHE_LIMIT}  # fmt: skip
    config = torch._dynamo.config
    for name, value in wanted.items():
        if hasattr(config, name):  # the names changed across torch versions
            setattr(config, name, max(getattr(config, name), value))
