"""FP8 weights for the DiTs: `apply_precision(model, "fp8")` turns the Linear layers of every transformer block
into float8 e4m3 codes with one float32 scale per output row; activations are quantized per token at run time.

Must not touch what stays precise (embeddings, time MLP, modulation, norms, head, Animate's conditioning
towers) nor a bf16 model, and must not hold a GEMM kernel of its own: on the GPU the matmul is torch's
row-wise scaled FP8 GEMM (`torch._scaled_mm`, cuBLASLt); on the CPU the same codes and scales are multiplied
dequantized in float32 (tests, the demo), which is the same function up to accumulation order.

Why `torch._scaled_mm` and not torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`:
on an H200 without the optional `mslk` package torchao's Float8Tensor ends in this very call, so the kernel is
the same; but torchao's `quantize_` refuses to run without an sm89+ GPU (the CPU tests would test other code),
its weights are tensor subclasses that the fast path's fused q/k/v (plain-tensor views) cannot hold, and
each torchao release is built for one torch (0.18 for torch 2.11: one more wheel to carry and re-pin).
Here the weight is a plain float8 tensor: fused q/k/v concatenates codes and row scales exactly, `.to(device)`
(offload) moves it, and the activation quantization is plain torch ops that torch.compile can fuse
into the kernels before the GEMM.

What stays in higher precision, and why:
* patch_embedding (Conv3d over the latent): a convolution (no FP8 GEMM path), 0.7 M weights, and its input
  is the noisy latent whose small differences are the signal.
* text_embedding: two GEMMs once per forward on 512 tokens (< 0.1% of the FLOPs), and its output is the
  key/value source of all 40 cross-attentions: an error there reaches every block.
* time_embedding / time_projection / every block's and the head's modulation: fp32 in the reference; one row
  per forward; they scale and shift every token of every block, the most sensitive numbers of the model.
* head: fp32 in the reference; writes the velocity itself; one 5120 x 64 GEMM.
* norms and biases: vectors, nothing to speed up (the bias is added in the GEMM's epilogue in bf16).
* Animate's img_emb, face encoder / adapter, motion encoder, pose embedding: few tokens or once per forward
  (< 4% of the FLOPs), and the reference's LoRA rule leaves them out as well.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pipeline.models import attention as attention_mod

log = logging.getLogger(__name__)
Tensor = torch.Tensor

PRECISIONS = ("bf16", "fp8")  # "bf16": the weights in the pool's dtype (bf16 on the GPU, float32 on the CPU)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: a row's largest magnitude maps here
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale (codes 0) instead of a division by zero
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
# cuBLASLt's fast FP8 accumulation (what torchao uses for inference): ~5-10% faster GEMMs on Hopper; the
# bench measures the forward's rel-L2 with it (--no-fast-accum to compare).
FAST_ACCUM = True
# The Linear layers converted in every transformer block (Animate adds the image key/value).
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)  # fmt: skip


class Fp8Unsupported(RuntimeError):
    """The device cannot run FP8 GEMMs; the message says which device, why, and what would."""


# ---------------------------------------------------------------------------------------------- quantization


def quantize(x: Tensor, dims: tuple[int, ...] = (-1,)) -> tuple[Tensor, Tensor]:
    """x -> (codes float8_e4m3fn, shape of x; scale float32, size 1 along `dims`): x ~= codes * scale.

    One scale per slice over `dims` (the last dim: per row / per token; (1, 3) of [B, L, H, D]: per head),
    chosen so that the slice's largest magnitude becomes 448. e4m3 keeps 3 mantissa bits: each element is
    rounded to within 2^-4 of its value (relative), whatever the slice's range."""
    amax = x.abs().amax(dim=dims, keepdim=True).float()  # exact in any float dtype
    scale = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    codes = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # x / scale is a new float32 tensor: x is untouched
    return codes, scale


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (codes.float() * scale).to(dtype)


def fp8_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
               kernel: str | None = None) -> Tensor:  # fmt: skip
    """x [..., K] @ (codes * scale)^T + bias -> [..., N] in out_dtype, x quantized per row first.

    codes [N, K] float8_e4m3fn, scale [N, 1] float32. kernel: "scaled_mm" (torch._scaled_mm, row-wise
    scales, bf16 out; the CUDA path) or "dequant" (float32 matmul of the dequantized factors; the CPU path);
    None picks by device. Both compute sum_k xq[m,k] wq[n,k] * sx[m] * sw[n] + b[n]."""
    if codes.dtype != FP8 or scale.dtype != torch.float32:
        raise RuntimeError(f"fp8 weights are {codes.dtype} codes with {scale.dtype} scales: the model was cast "
                           "after conversion; cast it before apply_precision (moving it is fine)")
    with torch.autocast(x.device.type, enabled=False):  # the factors' dtypes are the format: no recasting
        return _fp8_matmul(x, codes, scale, bias, out_dtype, kernel or ("scaled_mm" if x.is_cuda else "dequant"))


def _fp8_matmul(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                kernel: str) -> Tensor:  # fmt: skip
    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize(rows)
    if kernel == "scaled_mm":
        # Row-wise scaling: scale_a [M, 1], scale_b [1, N], b column-major ([K, N] view of [N, K] codes);
        # cuBLASLt gives it only with a bf16 output, and the bias is added in that epilogue.
        b = None if bias is None else bias.to(torch.bfloat16)
        out = torch._scaled_mm(xq, codes.t(), scale_a=xs, scale_b=scale.t(), bias=b, out_dtype=torch.bfloat16,
                               use_fast_accum=FAST_ACCUM).to(out_dtype)  # fmt: skip
    elif kernel == "dequant":
        out = dequantize(xq, xs) @ dequantize(codes, scale).t()
        out = (out if bias is None else out + bias.float()).to(out_dtype)
    else:
        raise ValueError(f"fp8 kernel: got {kernel!r}, expected 'scaled_mm' or 'dequant'")
    return out.reshape(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------- the layer


class Fp8Linear(nn.Linear):
    """nn.Linear holding float8 e4m3 weight codes [out, in] and float32 `weight_scale` [out, 1] (W = codes *
    scale); the bias stays in the layer's dtype. Takes and returns `compute_dtype` (what it was converted
    from). Made in place from a loaded nn.Linear by `Fp8Linear.convert` (same module, name and hooks).

    A dtype cast after conversion (model.to(bf16)) would turn the codes into plain numbers: cast first, then
    convert (`.to(device)` is fine). Loading a high-precision state dict re-quantizes it, bitwise as
    `convert` does, so a pool can restore its weights from the checkpoint."""

    weight_scale: Tensor
    compute_dtype: torch.dtype

    @classmethod
    def convert(cls, layer: nn.Linear, device: torch.device | None = None) -> Fp8Linear:
        """Quantize `layer` in place (on `device` if given, e.g. the GPU for a layer in host memory)."""
        if isinstance(layer, Fp8Linear):
            return layer
        weight = layer.weight
        if weight.is_meta:
            raise ValueError("fp8: the weights are on the meta device (not loaded yet); convert loaded weights")
        if type(weight.data) is not torch.Tensor:
            raise ValueError(f"fp8: cannot convert {type(weight.data).__name__} (FSDP-sharded) weights; with "
                             "precision fp8 both I2V experts fit one 80 GB GPU: use sharding replicate or offload")
        if layer.in_features % 16 or layer.out_features % 16:
            raise ValueError(f"fp8: Linear({layer.in_features}, {layer.out_features}): FP8 GEMMs need both "
                             "sizes to be multiples of 16")
        home = weight.device
        codes, scale = quantize(weight.detach().to(device or home))
        layer.__class__ = cls
        layer.compute_dtype = weight.dtype
        layer.weight = nn.Parameter(codes.to(home), requires_grad=False)
        layer.register_buffer("weight_scale", scale.to(home))
        return layer  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)

    def dequantized_weight(self) -> Tensor:
        """The weight this layer multiplies by, in compute_dtype (for checks and LoRA arithmetic)."""
        return dequantize(self.weight, self.weight_scale, self.compute_dtype)

    def set_weight(self, weight: Tensor) -> None:
        """Re-quantize from a high-precision [out, in] weight (e.g. W + a merged LoRA), in place."""
        codes, scale = quantize(weight.detach().to(self.weight.device))
        with torch.no_grad():
            self.weight.copy_(codes)
            self.weight_scale.copy_(scale)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        incoming = state_dict.get(prefix + "weight")
        if isinstance(incoming, Tensor) and incoming.dtype != FP8:  # a checkpoint's weight: quantize it
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3 per-row scales, compute {self.compute_dtype}"


# ---------------------------------------------------------------------------------------------- the model


def fp8_targets(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every Linear that precision fp8 converts: BLOCK_LINEARS of each of model.blocks."""
    for i, block in enumerate(model.blocks):  # type: ignore[union-attr, arg-type]
        for path in BLOCK_LINEARS:
            try:
                layer = block.get_submodule(path)
            except AttributeError:  # I2V blocks have no image key/value
                continue
            if isinstance(layer, nn.Linear):
                yield f"blocks.{i}.{path}", layer


def apply_precision(model: nn.Module, precision: str, *, device: torch.device | str | None = None,
                    fp8_attention: bool = False) -> nn.Module:  # fmt: skip
    """Run a loaded WanDiT / WanAnimateDiT in `precision`, in place; returns it.

    "bf16": nothing changes (the pool's dtype; an FP8 model stays FP8). "fp8": every fp8_targets layer
    becomes an Fp8Linear, quantized on `device` (default: where each weight lives; give the GPU for experts
    waiting in host memory), and, with fp8_attention, the attention picker may choose an 8-bit kernel (after
    its self-test; an explicit WANBOX_ATTENTION still wins). 8-bit attention is opt-in: measured on one H200
    (bench/RESULTS.md, 2026-12-03) FA3's FP8 forward makes a 720p forward 7.7 s instead of 9.0 s but moves it
    25% (rel-L2) from the bf16 one, against 4.5% for the FP8 GEMMs alone. Works before or after pipeline.models.fast.optimize (fused
    q/k/v are split, converted and fused again); not after FSDP sharding. Raises Fp8Unsupported on a GPU
    without FP8 tensor cores."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}, expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        attention_mod.allow_fp8(False)
        return model
    target = torch.device(device) if device is not None else next(model.parameters()).device
    check_fp8_support(target)
    fuse_again = []
    for block in model.blocks:  # type: ignore[union-attr]
        attn = block.self_attn
        if getattr(attn, "fused_intact", lambda: False)():
            attn.unfuse()  # q/k/v get their own storage, the fused bf16 copy goes
            fuse_again.append(attn)
    with torch.no_grad():
        for _name, layer in fp8_targets(model):
            Fp8Linear.convert(layer, target)
    for attn in fuse_again:
        attn.fuse()  # now one fp8 buffer of codes and one of row scales
    attention_mod.allow_fp8(fp8_attention)
    return model


def fp8_layers(model: nn.Module) -> int:
    return sum(isinstance(m, Fp8Linear) for m in model.modules())


def check_fp8_support(device: torch.device) -> None:
    """Raise Fp8Unsupported unless `device` can run this module's FP8 path (the CPU always can, slowly)."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.version.hip is not None:
        raise Fp8Unsupported(f"precision fp8: device {device} is not an NVIDIA GPU; FP8 runs on NVIDIA GPUs of "
                             f"compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    reason = fp8_unsupported_reason(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    if reason:
        raise Fp8Unsupported(f"{device}: {reason}")


def fp8_unsupported_reason(capability: tuple[int, int], name: str) -> str | None:
    """Why an NVIDIA GPU of this compute capability cannot run FP8 GEMMs (None: it can); for `wanbox doctor`."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"precision fp8: {name} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor "
            f"cores; FP8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada: L4, "
            "L40S, RTX 4090; Hopper: H100, H200; Blackwell); use precision bf16 on this GPU")  # fmt: skip


def describe(model: nn.Module) -> dict[str, Any]:
    """What computes this model's forwards, for the sidecar and `wanbox doctor`: precision, the kernel of
    the block Linears, the attention kernel (after its self-test) and how many layers are FP8."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        linear_kernel = "dense"
    else:
        linear_kernel = "scaled_mm_rowwise" if layers[0].weight.is_cuda else "dequant_fp32"
    return {"precision": "fp8" if layers else "bf16", "linear_kernel": linear_kernel,
            "attention_kernel": attention_mod.active_backend(), "fp8_layers": len(layers)}  # fmt: skip
