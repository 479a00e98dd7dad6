"""Scaled dot-product attention for the DiTs: one function, [B, L, H, D] layout, several kernels behind it.

Must not change the math: non-causal, softmax scale 1/sqrt(D), keys cut to `k_len`, nothing else.

Backend choice: module setting `BACKEND` or env var WANBOX_ATTENTION = auto | cudnn | flash | fa3 | math.
On CUDA the first call runs a small self-test of the chosen kernel against the math path and falls back
(auto order: fa3, cudnn, flash, math) when a kernel is missing or wrong. On CPU it is torch SDPA in the
input dtype (float32 in tests). On CUDA float32 inputs are cast to bfloat16 for the fused kernels, as the
reference's flash_attention does; the result comes back in q's dtype.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cudnn", "flash", "fa3", "math")
BACKEND: str = os.environ.get("WANBOX_ATTENTION", "auto").strip().lower() or "auto"
_AUTO_ORDER = ("fa3", "cudnn", "flash", "math")
FEW_KEYS = 64  # below this many keys CUDA calls use plain SDPA (see attention())
_checked: dict[str, bool] = {}  # backend -> passed the CUDA self-test


def set_backend(name: str) -> None:
    """Choose the attention kernel for the whole process (e.g. from a worker flag)."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    BACKEND = name


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
    wanted = BACKEND if BACKEND in BACKENDS else "auto"
    candidates = _AUTO_ORDER if wanted == "auto" else (wanted, *[b for b in _AUTO_ORDER if b != wanted])
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
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 77, 4, 128, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
        got = _run_cuda(name, q, k[:, :70], v[:, :70]).float()
        want = attention_math(q, k, v, 70).float()
        err = (got - want).norm() / want.norm()
        return bool(err < 2e-2)
    except Exception as exc:  # a missing or broken kernel must only cost us the fallback
        log.info("attention backend %s unavailable: %s", name, exc)
        return False


def _run_cuda(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out_dtype = q.dtype
    if name == "math":
        return attention_math(q, k, v)
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = q.to(half), k.to(half), v.to(half)
    if name == "fa3":
        import flash_attn_interface  # optional FlashAttention-3 wheel

        out = flash_attn_interface.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(out_dtype)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel([kernel]):
        return _sdpa(q, k, v).to(out_dtype)
