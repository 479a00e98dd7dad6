"""umT5-XXL text encoder (Wan's `models_t5_umt5-xxl-enc-bf16.pth`): token ids -> per-prompt embeddings.

Must not change the reference numerics (no 1/sqrt(d) scaling, per-layer position bias, dtype-min masking).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.weights.pth import TorchFileError, load_torch_file

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"
CONFIG_FILE = "t5_config.json"
MAX_DISTANCE = 128  # relative distances beyond this share the last bucket (reference default)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as the expected model; the message names file and key."""


# --------------------------------------------------------------------------------------------------------
# Checkpoint helpers shared by the VAE, T5 and CLIP loaders.


def load_pth(path: str | Path) -> dict[str, Tensor]:
    """A `.pth` state dict without running pickled code: memory-mapped, or read whole if legacy (non-zip)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = load_torch_file(path)
    except TorchFileError as exc:
        raise CheckpointError(f"{path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return dict(state)


def require_key(state: Mapping[str, Tensor], key: str, source: str | Path) -> Tensor:
    """One tensor of a checkpoint, or an error naming the file and the key."""
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state[key]


def load_checked(module: nn.Module, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Assign `state` to `module` after checking that keys and shapes match exactly (strict)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
    module.load_state_dict(state, strict=True, assign=True)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def count_indices(state: Mapping[str, Tensor], prefix: str) -> int:
    """1 + the largest N among keys `<prefix>N.*` (0 when there are none)."""
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


# --------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class T5Config:
    """Encoder sizes; field names are those of the reference constructor (and of `t5_config.json`)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    encoder_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping, source: str | Path = "config") -> T5Config:
        """Known fields only; extra ones (dropout, text_len, note, ...) are not model sizes."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name, value in values.items():
            wanted = bool if name == "shared_pos" else int
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                raise CheckpointError(f"{source}: field {name!r} = {value!r}, expected {wanted.__name__}")
        return cls(**values)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], source: str | Path) -> T5Config:
        """Every size can be read off the tensor shapes (heads from the position-bias table)."""
        emb = require_key(state, "token_embedding.weight", source)
        layers = count_indices(state, "blocks.")
        if layers == 0:
            raise CheckpointError(f"{source}: missing key 'blocks.0.attn.q.weight' (no encoder blocks)")
        shared = "pos_embedding.embedding.weight" in state
        pos_key = "pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"
        pos = require_key(state, pos_key, source)
        return cls(
            vocab_size=emb.shape[0],
            dim=emb.shape[1],
            dim_attn=require_key(state, "blocks.0.attn.q.weight", source).shape[0],
            dim_ffn=require_key(state, "blocks.0.ffn.fc1.weight", source).shape[0],
            num_heads=pos.shape[1],
            encoder_layers=layers,
            num_buckets=pos.shape[0],
            shared_pos=shared,
        )


# --------------------------------------------------------------------------------------------------------
# Modules (attribute names = the reference's state-dict keys)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def gelu_tanh(x: Tensor) -> Tensor:
    """The tanh GELU written out as the reference writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GeluTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return gelu_tanh(x)


def relative_buckets(lq: int, lk: int, num_buckets: int, device: torch.device) -> Tensor:
    """Bidirectional T5 bucket of (key position - query position), [lq, lk]."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # log(0) is masked out by the `where` below; clamping keeps the cast to long well defined.
    far = (
        exact
        + (
            torch.log(dist.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)
        ).long()
    )
    far = far.clamp(max=half - 1)
    return buckets + torch.where(dist < exact, dist, far)


class RelativeBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> Tensor:
        buckets = relative_buckets(lq, lk, self.num_buckets, self.embedding.weight.device)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, heads, lq, lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor, pos_bias: Tensor) -> Tensor:
        b, length, n, d = x.size(0), x.size(1), self.num_heads, self.head_dim
        q = self.q(x).view(b, length, n, d)
        k = self.k(x).view(b, length, n, d)
        v = self.v(x).view(b, length, n, d)
        bias = x.new_zeros(b, n, length, length) + pos_bias
        bias.masked_fill_(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d): T5 folds it into init
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.einsum("bnij,bjnc->binc", weights, v).reshape(b, length, n * d)
        return self.o(out)


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GeluTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: Tensor) -> Tensor:
    """float16 activations overflow in deep layers; the reference clamps them just below the maximum."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-limit, max=limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: Tensor, mask: Tensor, shared_bias: Tensor | None) -> Tensor:
        length = x.size(1)
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(length, length)
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask, bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """The umT5 encoder stack. `encode` is the pipeline's entry point; `forward` returns every position."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.encoder_layers))
        self.norm = T5LayerNorm(cfg.dim)

    @classmethod
    def from_checkpoint(
        cls,
        pth_path: str | Path,
        config: T5Config | Mapping | str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> T5Encoder:
        """Load the released `.pth` (strict). Sizes: `config`, else `t5_config.json` beside the file,
        else inferred from the tensor shapes; a config that disagrees with the shapes is an error."""
        pth_path = Path(pth_path)
        state = load_pth(pth_path)
        cfg = _resolve_config(config, pth_path, state)
        with torch.device("meta"):
            model = cls(cfg)
        load_checked(model, state, pth_path)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[B, L] ids and mask (1 = token, 0 = padding) -> [B, L, dim]; padding keys are masked out."""
        x = self.token_embedding(ids)
        length = x.size(1)
        shared_bias = self.pos_embedding(length, length) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, shared_bias)
        return self.norm(x)

    @torch.no_grad()
    def encode(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """Embeddings per sample, cut to that sample's true length (mask sum, EOS included)."""
        self._check_inputs(ids, mask)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        out = self.forward(ids, mask)
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [row[:n] for row, n in zip(out, lengths, strict=True)]

    def _check_inputs(self, ids: Tensor, mask: Tensor) -> None:
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"ids and mask: shapes {list(ids.shape)} and {list(mask.shape)}, expected equal [B, L]"
            )
        if ids.dtype.is_floating_point:
            raise ValueError(f"ids: dtype {ids.dtype}, expected an integer dtype")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"ids: values in [{int(ids.min())}, {int(ids.max())}], "
                f"expected within [0, {self.config.vocab_size}) (the encoder's vocab_size)"
            )


def _resolve_config(
    config: T5Config | Mapping | str | Path | None, pth_path: Path, state: Mapping[str, Tensor]
) -> T5Config:
    inferred = T5Config.from_state_dict(state, pth_path)
    source: str | Path = "config"
    if config is None and (pth_path.parent / CONFIG_FILE).is_file():
        config = pth_path.parent / CONFIG_FILE
    if config is None:
        return inferred
    if isinstance(config, (str, Path)):
        source = Path(config)
        config = read_json(source)
    cfg = config if isinstance(config, T5Config) else T5Config.from_mapping(config, source)
    for f in fields(T5Config):
        if getattr(cfg, f.name) != getattr(inferred, f.name):
            raise CheckpointError(
                f"{source}: {f.name} = {getattr(cfg, f.name)!r}, but {pth_path} has "
                f"{getattr(inferred, f.name)!r} (read from the tensor shapes)"
            )
    return cfg


# --------------------------------------------------------------------------------------------------------
# Prompts -> embeddings, given a checkpoint directory in the released layout


class TextEncoder:
    """Tokenizer + encoder of a checkpoint dir (`models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`)."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        text_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        from pipeline.models.tokenizer import Umt5Tokenizer

        ckpt_dir = Path(ckpt_dir)
        pth = ckpt_dir / T5_FILE
        config_path = ckpt_dir / CONFIG_FILE
        extra = read_json(config_path) if config_path.is_file() else {}
        if text_len is None:
            text_len = int(extra.get("text_len", 512))
        self.tokenizer = Umt5Tokenizer(ckpt_dir / TOKENIZER_SUBDIR, text_len=text_len)
        self.model = T5Encoder.from_checkpoint(pth, dtype=dtype, device=device)
        vocab = self.tokenizer.vocab_size
        if vocab > self.model.config.vocab_size:
            raise CheckpointError(
                f"{ckpt_dir / TOKENIZER_SUBDIR}: tokenizer has {vocab} tokens, more than the "
                f"{self.model.config.vocab_size} rows of token_embedding.weight in {pth}"
            )

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder's weights (the tokenizer runs on the CPU); returns self."""
        self.model.to(device)
        return self

    def __call__(self, prompts: str | Sequence[str]) -> list[Tensor]:
        ids, mask = self.tokenizer(prompts)
        return self.model.encode(ids, mask)
