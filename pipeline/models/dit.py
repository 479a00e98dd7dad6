"""The Wan2.2 I2V diffusion transformer (one expert of I2V-A14B), checkpoint-compatible with the release.

Must not change the reference function (WAN_SPEC §2): key names, math and fp32 islands stay as released;
only faster equivalent forms (fp32 RoPE tables, per-sample modulation broadcast) are allowed.

Call convention (batch of one):
    out = model(x, t, context, seq_len, y, sp=None)
x [16, T, H, W] latent (or a list holding one, then the result is a list holding one), t int64 [1] (one
timestep) or [1, seq_len] (per token), context [Lc, text_dim] (T5 output trimmed to its length, zero-padded
to text_len here), y [20, T, H, W] (mask + image latent). Returns [16, T, H, W] float32.

dtype: weights fp32 or bf16. Run under torch.autocast("cuda", torch.bfloat16) (or plainly with bf16 weights)
to get the reference's bf16 numerics; the fp32 islands (time embedding, modulation, norms, gated residuals,
RoPE, head) are forced here regardless of autocast.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import attention
from pipeline.models.rope import apply_rope, rope_tables

log = logging.getLogger(__name__)
Tensor = torch.Tensor
Rope = tuple[Tensor, Tensor]


class SequenceParallel(Protocol):
    """What the DiT needs from a sequence-parallel group (implemented in pipeline/parallel/)."""

    world_size: int
    rank: int

    def shard(self, x: Tensor, dim: int) -> Tensor: ...

    def gather(self, x: Tensor, dim: int) -> Tensor: ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor, k_len: int) -> Tensor: ...


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of WanModel; defaults are the 14B I2V expert (config.json overrides them)."""

    model_type: str = "i2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 36
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> DiTConfig:
        """Build from a diffusers config dict. `_`-prefixed bookkeeping keys are skipped; unknown keys are
        logged and ignored (a newer diffusers may add some; the strict shape check at load catches any that
        would change the architecture). Values of the wrong type are errors."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key not in known:
                log.warning("%s: ignoring unknown field %r", source, key)
                continue
            values[key] = _typed(source, key, value, getattr(cls(), key))
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: Path | str) -> DiTConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the model config: {exc}") from exc
        return cls.from_dict(raw, str(path))

    @classmethod
    def real_14b(cls) -> DiTConfig:
        return cls()

    def validate(self, source: str = "config") -> None:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"{source}: dim {self.dim} must split into {self.num_heads} heads of even size")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError(f"{source}: window_size {self.window_size} unsupported; expected (-1, -1)")
        if len(self.patch_size) != 3:
            raise ValueError(f"{source}: patch_size {self.patch_size} must have 3 entries (t, h, w)")


def _typed(source: str, key: str, value: Any, default: Any) -> Any:
    """Check a config value against the default's type (JSON lists become tuples)."""
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        value = tuple(value) if ok else value
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{source}: field {key!r} = {value!r}; expected a {type(default).__name__} like {default!r}")
    return value


# ---------------------------------------------------------------------------------------------- parts


def sinusoidal_embedding(freq_dim: int, t: Tensor) -> Tensor:
    """[N] timesteps -> [N, freq_dim] float32: cos first, then sin, formed in float64 like the reference."""
    half = freq_dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = torch.outer(pos, freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1).float()


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear in the weight dtype (bf16 weights => bf16 matmul, the same as the reference's autocast); an FP8
    layer (pipeline.models.fp8) takes the dtype it was converted from and quantizes x itself."""
    return layer(x.to(getattr(layer, "compute_dtype", layer.weight.dtype)))


def linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear forced to float32 whatever the autocast state (the reference's fp32 islands)."""
    with torch.autocast(x.device.type, enabled=False):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, then times `weight` (type promotion as ref)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm32(nn.Module):
    """LayerNorm computed in fp32 and cast back to x's dtype; parameter-free unless `affine`."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """q/k RMSNorm over the full width, 3D RoPE, attention over the true tokens, output projection."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: Rope, k_len: int, sp: SequenceParallel | None) -> Tensor:
        heads = (self.num_heads, -1)
        v = linear(self.v, x).unflatten(2, heads)
        # RoPE in fp32, then q/k in v's dtype: the reference's kernel casts all three to bf16 on the GPU,
        # and doing it here halves what sequence parallelism sends for q and k.
        q = apply_rope(self.norm_q(linear(self.q, x)).unflatten(2, heads), *rope).to(v.dtype)
        k = apply_rope(self.norm_k(linear(self.k, x)).unflatten(2, heads), *rope).to(v.dtype)
        out = sp.attention(q, k, v, k_len) if sp is not None else attention(q, k, v, k_len)
        return linear(self.o, out.flatten(2))


class CrossAttention(nn.Module):
    """Unmasked attention to the text tokens (and, for Animate, a second one to the image tokens, summed)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, with_image: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        if with_image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.with_image = with_image

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None = None) -> Tensor:
        heads = (self.num_heads, -1)
        v = linear(self.v, context).unflatten(2, heads)
        q = self.norm_q(linear(self.q, x)).unflatten(2, heads).to(v.dtype)
        k = self.norm_k(linear(self.k, context)).unflatten(2, heads).to(v.dtype)
        out = attention(q, k, v)
        if self.with_image:
            if image_context is None:
                raise ValueError("this block attends to image tokens: image_context is required")
            v_img = linear(self.v_img, image_context).unflatten(2, heads)
            k_img = self.norm_k_img(linear(self.k_img, image_context)).unflatten(2, heads).to(v_img.dtype)
            out = out + attention(q, k_img, v_img)
        return linear(self.o, out.flatten(2))


class DiTBlock(nn.Module):
    """1. modulated self-attention, 2. cross-attention, 3. modulated feed-forward; gated residuals in fp32."""

    def __init__(self, cfg: DiTConfig, with_image: bool = False) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm32(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps, with_image)
        self.norm2 = LayerNorm32(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: Rope,
        k_len: int,
        context: Tensor,
        image_context: Tensor | None,
        sp: SequenceParallel | None,
    ) -> Tensor:
        # e0 [B, 1 or L, 6, dim] fp32; each of the six parts broadcasts over tokens.
        with torch.autocast(x.device.type, enabled=False):
            mod = e0 + self.modulation.float().unsqueeze(0)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=2)

        # 1. self-attention
        y = self.self_attn(self.norm1(x).float() * (1 + scale_msa) + shift_msa, rope, k_len, sp)
        x = x + y.float() * gate_msa
        # 2. cross-attention (no modulation, no gate)
        x = x + self.cross_attn(self.norm3(x), context, image_context).float()
        # 3. feed-forward
        h = self.norm2(x).float() * (1 + scale_mlp) + shift_mlp
        y = linear(self.ffn[2], self.ffn[1](linear(self.ffn[0], h)))
        return x + y.float() * gate_mlp


class Head(nn.Module):
    """Final norm, modulation by the time embedding `e` (before time_projection), projection to patches; fp32."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            mod = self.modulation.float().unsqueeze(0) + e.unsqueeze(2)  # [B, 1 or L, 2, dim]
            shift, scale = mod.unbind(dim=2)
            return linear_fp32(self.head, self.norm(x.float()) * (1 + scale) + shift)


# ---------------------------------------------------------------------------------------------- model


class WanDiT(nn.Module):
    """WanModel (i2v): patch embedding, text/time embeddings, `num_layers` blocks, head, unpatchify."""

    def __init__(self, config: DiTConfig, image_attention: bool = False) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            DiTBlock(config, image_attention) for _ in range(config.num_layers)
        )
        self.head = Head(config)

    # -- public entry point ---------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor | list[Tensor],
        t: Tensor,
        context: Tensor | list[Tensor],
        seq_len: int,
        y: Tensor | list[Tensor] | None = None,
        sp: SequenceParallel | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Tensor | list[Tensor]:
        """Velocity prediction [16, T, H, W] (a list of one when x is a list of one). `record` collects
        intermediates (patch_embedding, time_embedding, time_projection, text_embedding, block<i>, head)."""
        as_list = isinstance(x, (list, tuple))
        latent = _one(x, "x")
        if y is not None:
            latent = torch.cat([latent, _one(y, "y").to(latent.dtype)], dim=0)
        if latent.shape[0] != self.config.in_dim:
            raise ValueError(f"x and y together have {latent.shape[0]} channels; the model expects {self.config.in_dim}")
        tokens = self.embed_patches(latent, record)
        grid = tuple(tokens.shape[2:])
        out = self.transformer(tokens.flatten(2).transpose(1, 2), grid, t, context, seq_len, sp, record=record)
        video = self.unpatchify(out, grid)
        return [video] if as_list else video

    # -- stages (reused by WanAnimateDiT) -------------------------------------------------------------

    def embed_patches(self, latent: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """[C, T, H, W] -> [1, dim, T, H/2, W/2] (patch size from the config)."""
        _check_divisible(latent.shape[1:], self.config.patch_size)
        w = self.patch_embedding.weight
        out = self.patch_embedding(latent[None].to(w.dtype))
        _keep(record, "patch_embedding", out)
        return out

    def transformer(
        self,
        tokens: Tensor,
        grid: tuple[int, ...],
        t: Tensor,
        context: Tensor | list[Tensor],
        seq_len: int,
        sp: SequenceParallel | None,
        image_context: Tensor | None = None,
        after_block: Callable[[int, Tensor], Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Tokens [1, L, dim] -> head output [1, rows, out*prod(patch)], rows = seq_len rounded up to the
        sequence-parallel world size (gathered on every rank)."""
        num_tokens = tokens.shape[1]
        if num_tokens > seq_len:
            raise ValueError(f"seq_len {seq_len} is smaller than the {num_tokens} tokens of grid {grid}")
        world = sp.world_size if sp is not None else 1
        rows = -(-seq_len // world) * world
        x = F.pad(tokens, (0, 0, 0, rows - num_tokens))
        e, e0 = self.time_embed(t, seq_len, rows, x.device, record)
        text = self.embed_text(context, record)
        cos, sin = rope_tables(grid, self.config.head_dim, rows, x.device)
        if sp is not None:
            x, cos, sin = sp.shard(x, 1), sp.shard(cos, 0), sp.shard(sin, 0)
            if e.shape[1] > 1:  # per-token modulation travels with its tokens
                e, e0 = sp.shard(e, 1), sp.shard(e0, 1)
        for i, block in enumerate(self.blocks):
            x = block(x, e0, (cos, sin), num_tokens, text, image_context, sp)
            _keep(record, f"block{i}", x, sp)
            if after_block is not None:
                x = after_block(i, x)
        x = self.head(x, e)
        if sp is not None:
            x = sp.gather(x, 1)
        _keep(record, "head", x)
        return x

    def time_embed(
        self, t: Tensor, seq_len: int, rows: int, device: torch.device, record: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """e [B, 1 or rows, dim] and e0 [B, 1 or rows, 6, dim], fp32. One row when every token shares t
        (the I2V case): the same numbers as the reference's per-token tensors without their memory."""
        t = torch.as_tensor(t, device=device)
        t = t.reshape(1) if t.dim() == 0 else t
        if t.dim() == 2:
            if t.shape[1] != seq_len:
                raise ValueError(f"per-token t has shape {tuple(t.shape)}; expected [B, seq_len={seq_len}]")
            if bool((t == t[:, :1]).all()):
                t = t[:, 0]
            else:  # sequence-parallel rounding adds rows: give them the last token's t (padding only)
                t = torch.cat([t, t[:, -1:].expand(-1, rows - seq_len)], dim=1)
        if t.dim() != 1 and t.dim() != 2:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [B] or [B, seq_len]")
        batch, per_token = t.shape[0], t.shape[1] if t.dim() == 2 else 1
        with torch.autocast(device.type, enabled=False):
            sin_emb = sinusoidal_embedding(self.config.freq_dim, t.flatten())
            e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], sin_emb)))
            e0 = linear_fp32(self.time_projection[1], F.silu(e))
        e = e.view(batch, per_token, -1)
        e0 = e0.view(batch, per_token, 6, -1)
        if record is not None:
            _keep(record, "time_embedding", e.expand(batch, rows, -1)[:, :seq_len])
            _keep(record, "time_projection", e0.flatten(2).expand(batch, rows, -1)[:, :seq_len])
        return e, e0

    def embed_text(self, context: Tensor | list[Tensor], record: dict[str, Tensor] | None = None) -> Tensor:
        """T5 output [Lc, text_dim] -> zero-padded to text_len -> text_embedding -> [1, text_len, dim]."""
        ctx = _one(context, "context")
        cfg = self.config
        if ctx.dim() != 2 or ctx.shape[1] != cfg.text_dim or ctx.shape[0] > cfg.text_len:
            raise ValueError(
                f"context has shape {tuple(ctx.shape)}; expected [length <= {cfg.text_len}, {cfg.text_dim}]"
            )
        ctx = F.pad(ctx, (0, 0, 0, cfg.text_len - ctx.shape[0]))[None]
        out = linear(self.text_embedding[2], self.text_embedding[1](linear(self.text_embedding[0], ctx)))
        _keep(record, "text_embedding", out)
        return out

    def unpatchify(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        """[1, rows, pt*ph*pw*C] -> [C, T, H, W] float32, dropping padding rows."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        u = x[0, : f * h * w].float().view(f, h, w, pt, ph, pw, c)
        return u.permute(6, 0, 3, 1, 4, 2, 5).reshape(c, f * pt, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------- helpers


def _one(value: Tensor | list[Tensor] | tuple[Tensor, ...], name: str) -> Tensor:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{name}: batch of {len(value)} given; this model runs one sample per call")
        return value[0]
    return value


def _check_divisible(shape: torch.Size | tuple[int, ...], patch: tuple[int, ...]) -> None:
    if any(n % p for n, p in zip(shape, patch, strict=True)):
        raise ValueError(f"latent [T, H, W] = {list(shape)} is not divisible by the patch size {list(patch)}")


def _keep(record: dict[str, Tensor] | None, name: str, value: Tensor, sp: SequenceParallel | None = None) -> None:
    if record is not None:
        record[name] = (sp.gather(value, 1) if sp is not None else value).detach().float()
