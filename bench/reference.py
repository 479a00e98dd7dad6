"""Loads the public Wan2.2 reference's WanModel from a source checkout, for side-by-side benchmarks.

Nothing of the reference is vendored: the caller points at a checkout fetched for the run. This module only
supplies stand-ins for the two imports a GPU machine may lack (diffusers' config mixins, FlashAttention): the
reference's `flash_attention` runs on torch SDPA, or on its own FlashAttention-3 call where an FA3 build exists.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "wan_reference"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> torch.Tensor:
    """The reference's `flash_attention` contract: half-precision inputs, q scaled, keys cut to k_lens, the
    result in q's dtype; the kernel is the one use_reference_attention() chose (window_size and version are
    the reference's local-attention and FA-version knobs, unused by its forward)."""
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    q, k, v = (x if x.dtype in half else x.to(dtype) for x in (q, k, v))
    if q_scale is not None:
        q = q * q_scale
    kernel = _ATTENTION["kernel"]
    out = kernel(q, k, v, q_lens, k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 deterministic=deterministic)  # fmt: skip
    return out.to(out_dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None,
                   k_lens: torch.Tensor | None, *, dropout_p: float, softmax_scale: float | None, causal: bool,
                   deterministic: bool) -> torch.Tensor:  # fmt: skip
    """Torch SDPA per sample. This is how the published baseline timing was taken (the reference hard-requires
    FlashAttention, which the benchmark machines lacked). The backend is whatever `sdpa_kernel` allows."""
    outs = []
    for i in range(q.size(0)):
        k_len = k.size(1) if k_lens is None else int(k_lens[i])
        o = F.scaled_dot_product_attention(
            q[i : i + 1].transpose(1, 2),
            k[i : i + 1, :k_len].transpose(1, 2),
            v[i : i + 1, :k_len].transpose(1, 2),
            dropout_p=dropout_p,
            is_causal=causal,
            scale=softmax_scale,
        )
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None,
                  k_lens: torch.Tensor | None, *, dropout_p: float, softmax_scale: float | None, causal: bool,
                  deterministic: bool) -> torch.Tensor:  # fmt: skip
    """The reference's own FlashAttention-3 call: sequences packed, `flash_attn_varlen_func` over cu_seqlens.

    The reference indexes the call's result with [0] (older FA3 builds returned (out, lse)); newer builds
    return the output alone, so both are accepted here. Everything else is the reference's call.
    """
    import flash_attn_interface  # an FA3 build must be importable for this backend

    b, lq, lk = q.size(0), q.size(1), k.size(1)
    q_lens = torch.full((b,), lq, dtype=torch.int32) if q_lens is None else q_lens
    k_lens = torch.full((b,), lk, dtype=torch.int32) if k_lens is None else k_lens
    q = torch.cat([u[:n] for u, n in zip(q, q_lens, strict=True)])
    k = torch.cat([u[:n] for u, n in zip(k, k_lens, strict=True)])
    v = torch.cat([u[:n] for u, n in zip(v, k_lens, strict=True)])
    cumulative = lambda lens: torch.cat([lens.new_zeros([1]), lens]).cumsum(0, dtype=torch.int32).to(q.device)  # noqa: E731
    out = flash_attn_interface.flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cumulative(q_lens), cu_seqlens_k=cumulative(k_lens), seqused_q=None,
        seqused_k=None, max_seqlen_q=lq, max_seqlen_k=lk, softmax_scale=softmax_scale, causal=causal,
        deterministic=deterministic,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.unflatten(0, (b, lq))


# The kernel behind the reference's `flash_attention`: set by use_reference_attention().
_ATTENTION = {"kernel": sdpa_attention}


def use_reference_attention(name: str) -> None:
    """'fa3': the reference's FlashAttention-3 call; anything else: torch SDPA (the caller picks its backend)."""
    _ATTENTION["kernel"] = fa3_attention if name == "fa3" else sdpa_attention


def _install_stand_ins() -> None:
    """Registers a package for the reference modules and, where missing, diffusers' two mixins."""
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = []  # a namespace for the loaded files only
    attention = types.ModuleType(f"{PACKAGE}.attention")
    attention.flash_attention = flash_attention
    sys.modules[PACKAGE] = pkg
    sys.modules[f"{PACKAGE}.attention"] = attention
    try:
        import diffusers  # noqa: F401

        return
    except ImportError:
        pass
    config_utils = types.ModuleType("diffusers.configuration_utils")
    config_utils.ConfigMixin = type("ConfigMixin", (), {})
    config_utils.register_to_config = lambda init: init
    modeling_utils = types.ModuleType("diffusers.models.modeling_utils")
    modeling_utils.ModelMixin = nn.Module
    for name, module in {
        "diffusers": types.ModuleType("diffusers"),
        "diffusers.configuration_utils": config_utils,
        "diffusers.models": types.ModuleType("diffusers.models"),
        "diffusers.models.modeling_utils": modeling_utils,
    }.items():
        sys.modules[name] = module


def load_reference_model_module(source_dir: Path) -> types.ModuleType:
    """Imports `wan/modules/model.py` of a Wan2.2 checkout as `wan_reference.model`."""
    path = Path(source_dir) / "wan" / "modules" / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"reference source: {path} not found (expected a Wan2.2 checkout)")
    _install_stand_ins()
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_reference_i2v(
    module: types.ModuleType, config: dict, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The reference WanModel at `config` size, allocated on `device` without an fp32 CPU copy.

    Built on the meta device, then materialised; its RoPE table (a plain attribute, not a buffer) is rebuilt
    outside the meta context exactly as its constructor does. Weights are left uninitialised: the caller
    loads ours into it (same key names), so both models run the same weights.
    """
    with torch.device("meta"):
        model = module.WanModel(model_type="i2v", **config)
    model = model.to_empty(device=device).to(dtype)
    d = config["dim"] // config["num_heads"]
    model.freqs = torch.cat(
        [
            module.rope_params(1024, d - 4 * (d // 6)),
            module.rope_params(1024, 2 * (d // 6)),
            module.rope_params(1024, 2 * (d // 6)),
        ],
        dim=1,
    ).to(device)
    return model.eval().requires_grad_(False)
