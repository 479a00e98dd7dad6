"""Scaled dot-product attention for the DiTs: one function, [B, L, H, D] layout, several kernels behind it.

Must not change the math: non-causal, softmax scale 1/sqrt(D), keys cut to `k_len`, nothing else.

Backend choice: module setting `BACKEND` or env var WANBOX_ATTENTION = auto | cudnn | flash | fa3 | math
(| fa3-fp8 | sage with precision fp8). On CUDA the first call runs a small self-test of the chosen kernel
against the math path and falls back (auto order: fa3, cudnn, flash, math) when a kernel is missing or wrong.
On CPU it is torch SDPA in the input dtype (float32 in tests). On CUDA float32 inputs are cast to bfloat16 for
the fused kernels, as the reference's flash_attention does; the result comes back in q's dtype.

8-bit kernels (EIGHT_BIT) join the auto order only after allow_fp8(True), which precision fp8 calls
(pipeline.models.fp8): FlashAttention-3's FP8 forward (q/k/v in e4m3 with one scale per head, quantized
here) and SageAttention 1 (INT8 q k^T, FP16 P v; Triton). Their self-test allows EIGHT_BIT_TOLERANCE.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cudnn", "flash", "fa3", "fa3-fp8", "sage", "math")
EIGHT_BIT = ("fa3-fp8", "sage")
BACKEND: str = os.environ.get("WANBOX_ATTENTION", "auto").strip().lower() or "auto"
_AUTO_ORDER = ("fa3", "cudnn", "flash", "math")
# FA3's FP8 forward first; SageAttention 1 only ahead of torch's kernels: on Hopper it is not known to beat
# FA3's bf16 kernel (bench/bench_fp8.py times every candidate so that this order can follow the numbers).
_FP8_ORDER = ("fa3-fp8", "fa3", "sage", "cudnn", "flash", "math")
# The 8-bit self-test feeds inputs already on the per-head e4m3 grid, so what remains is the kernel's own
# rounding of the probabilities P to e4m3 before P v (FA3; ~2.5% rel-L2 on this problem, emulated) or its
# INT8 q k^T and FP16 P v (Sage, ~1%); a wrong scale or layout gives errors of order 1.
EIGHT_BIT_TOLERANCE = 6e-2
FEW_KEYS = 64  # below this many keys CUDA calls use plain SDPA (see attention())
_checked: dict[str, bool] = {}  # backend -> passed the CUDA self-test
_fp8_allowed = False
_warned: set[str] = set()


def set_backend(name: str) -> None:
    """Choose the attention kernel for the whole process (e.g. from a worker flag)."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    BACKEND = name


def allow_fp8(enabled: bool) -> None:
    """Let the picker try the 8-bit kernels first (after their self-test); precision fp8 turns this on."""
    global _fp8_allowed
    _fp8_allowed = bool(enabled)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the first `k_len` keys. q [B, Lq, H, D], k/v [B, Lk, H, D]."""
    if k_len is not None and k_len < k.shape[1]:
        k, v = k[:, :k_len], v[:, :k_len]
    if not q.is_cuda:
        # Mixed inputs (fp32 q/k after RoPE, bf16 v from bf16 weights) run in the half dtype, as on CUDA.
        half = next((t.dtype for t in (q, k, v) if t.dtype in (torch.float16, torch.bfloat16)), q.dtype)
        return _sdpa(q.to(half), k.to(half), v.to(half)).to(q.dtype)
    if k.shape[1] < FEW_KEYS and BACKEND != "math":
        # The face adapter's 5 keys per frame: negligible work, and torch's own kernel choice is the safest.
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        return _sdpa(q.to(half), k.to(half), v.to(half)).to(q.dtype)
    return _run_cuda(_pick_cuda_backend(), q, k, v)


def active_backend() -> str:
    """The kernel CUDA calls use now (after the self-test); 'sdpa' when CUDA is absent."""
    return _pick_cuda_backend() if torch.cuda.is_available() else "sdpa"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]; transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int | None = None) -> torch.Tensor:
    """Explicit softmax(QK^T)V in float32: the slow, obviously-correct path (self-test reference)."""
    if k_len is not None:
        k, v = k[:, :k_len], v[:, :k_len]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2).to(q.dtype)


def _pick_cuda_backend() -> str:
    order = _FP8_ORDER if _fp8_allowed else _AUTO_ORDER
    wanted = BACKEND if BACKEND in BACKENDS else "auto"
    if wanted in EIGHT_BIT and not _fp8_allowed:
        if wanted not in _warned:
            _warned.add(wanted)
            log.warning("attention backend %s is an 8-bit kernel, used only with precision fp8; picking another",
                        wanted)  # fmt: skip
        wanted = "auto"
    candidates = order if wanted == "auto" else (wanted, *[b for b in order if b != wanted])
    for name in candidates:
        if name not in _checked:
            _checked[name] = _self_test(name)
            if not _checked[name] and name == wanted:
                log.warning("attention backend %s failed its self-test; falling back", name)
        if _checked[name]:
            return name
    return "math"


def _self_test(name: str) -> bool:
    """Run the kernel on a small random problem (with a key cut) and compare with the math path."""
    if name == "math":
        return True
    try:
        q, k, v = self_test_inputs(name in EIGHT_BIT, "cuda")
        got = _run_cuda(name, q, k, v).float()
        want = attention_math(q, k, v).float()
        err = (got - want).norm() / want.norm()
        return bool(err < (EIGHT_BIT_TOLERANCE if name in EIGHT_BIT else 2e-2))
    except Exception as exc:  # a missing or broken kernel must only cost us the fallback
        log.info("attention backend %s unavailable: %s", name, exc)
        return False


def self_test_inputs(eight_bit: bool, device: str | torch.device) -> tuple[torch.Tensor, ...]:
    """q [1, 77, 4, 128], k/v [1, 70, 4, 128] bf16 (a key count that is not a tile multiple), heads of
    different sizes (a kernel that mixes up per-head scales fails). eight_bit: every value on its head's
    e4m3 grid, so that quantizing per head (fa3-fp8) is exact and only the kernel's own rounding remains."""
    from pipeline.models.fp8 import dequantize, quantize

    gen = torch.Generator(device=device).manual_seed(0)
    head_sizes = ((0.5, 1.0, 2.0, 3.0), (1.0, 0.5, 2.0, 1.0), (1.0, 10.0, 0.1, 3.0))  # q, k, v
    q, k, v = (torch.randn(1, n, 4, 128, device=device, generator=gen) * torch.tensor(s, device=device)[:, None]
               for n, s in zip((77, 70, 70), head_sizes, strict=True))  # fmt: skip
    if eight_bit:
        q, k, v = (dequantize(*quantize(t, dims=(1, 3))) for t in (q, k, v))
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def _run_cuda(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out_dtype = q.dtype
    if name == "math":
        return attention_math(q, k, v)
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = q.to(half), k.to(half), v.to(half)
    if name in ("fa3", "fa3-fp8"):
        import flash_attn_interface  # optional FlashAttention-3 wheel

        if name == "fa3":
            out = flash_attn_interface.flash_attn_func(q, k, v)
        else:  # e4m3 q/k/v with one scale per (batch, head): FA3's FP8 contract; the output comes in bf16
            from pipeline.models.fp8 import quantize

            (q8, sq), (k8, sk), (v8, sv) = (quantize(t, dims=(1, 3)) for t in (q, k, v))
            out = flash_attn_interface.flash_attn_func(q8, k8, v8, q_descale=sq.flatten(1),
                                                       k_descale=sk.flatten(1), v_descale=sv.flatten(1))
        out = out[0] if isinstance(out, tuple) else out
        return out.to(out_dtype)
    if name == "sage":
        from sageattention import sageattn  # optional SageAttention 1 (Triton)

        # Its smooth_k subtracts k's mean over the keys in place (softmax does not change); done here on a
        # new tensor instead, so that the caller's k (a view of the fused projection) stays as it was.
        k = k - k.mean(dim=1, keepdim=True)
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, smooth_k=False).to(out_dtype)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel([kernel]):
        return _sdpa(q, k, v).to(out_dtype)
