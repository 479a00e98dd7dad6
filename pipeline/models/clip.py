"""CLIP ViT-H/14 vision tower (open-clip XLM-RoBERTa checkpoint) giving Animate's 257-token image features.

Must not change the reference preprocessing (tensor bicubic resize to 224, no crop) or use the last block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.t5 import CheckpointError, count_indices, load_checked, load_pth, read_json

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CONFIG_FILE = "clip_config.json"
PREFIX = "visual."
TEXT_PREFIX = "textual."  # the text tower: in the file, never used for image features
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
REAL_HEAD_DIM = 80  # ViT-H/14: 1280 wide, 16 heads


@dataclass(frozen=True)
class ClipVisionConfig:
    """Vision sizes; the JSON names are those of the reference constructor (`clip_config.json`)."""

    image_size: int = 224
    patch_size: int = 14
    vision_dim: int = 1280
    vision_heads: int = 16
    vision_layers: int = 32
    vision_mlp_ratio: int = 4
    norm_eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_mapping(cls, data: Mapping, source: str | Path = "config") -> ClipVisionConfig:
        """Known fields only (text-tower fields and notes are ignored)."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for name, value in values.items():
            if name != "norm_eps" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CheckpointError(f"{source}: field {name!r} = {value!r}, expected a positive integer")
        return cls(**values)

    @classmethod
    def from_state_dict(
        cls, visual: Mapping[str, Tensor], source: str | Path, heads: int | None
    ) -> ClipVisionConfig:
        """Everything but the head count follows from the shapes; heads default to 80-wide ones."""
        patch = _visual_key(visual, "patch_embedding.weight", source)
        width, patch_size = patch.shape[0], patch.shape[-1]
        grid = math.isqrt(_visual_key(visual, "pos_embedding", source).shape[1] - 1)
        layers = count_indices(visual, "transformer.")
        if layers < 2:
            raise CheckpointError(
                f"{source}: found {layers} 'visual.transformer.N' blocks, expected at least 2"
            )
        mlp = _visual_key(visual, "transformer.0.mlp.0.weight", source).shape[0]
        if heads is None:
            if width % REAL_HEAD_DIM:
                raise CheckpointError(
                    f"{source}: vision width {width} is not a multiple of {REAL_HEAD_DIM}; give the head "
                    f"count in {CONFIG_FILE} (field 'vision_heads')"
                )
            heads = width // REAL_HEAD_DIM
        return cls(grid * patch_size, patch_size, width, heads, layers, mlp // width)


def _visual_key(visual: Mapping[str, Tensor], key: str, source: str | Path) -> Tensor:
    if key not in visual:
        raise CheckpointError(f"{source}: missing key {PREFIX + key!r}")
    return visual[key]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [b, heads, s, d], scale 1/sqrt(d)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        dim = cfg.vision_dim
        self.norm1 = LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(dim, cfg.vision_heads)
        self.norm2 = LayerNorm(dim, eps=cfg.norm_eps)
        hidden = dim * cfg.vision_mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """Patch embedding, class token, positions, pre-norm and the first (layers - 1) blocks."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        dim = cfg.vision_dim
        self.patch_embedding = nn.Conv2d(3, dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.tokens, dim))
        self.pre_norm = LayerNorm(dim, eps=cfg.norm_eps)
        # Wan takes the penultimate block's output, so the last block is never built.
        self.transformer = nn.Sequential(*(Block(cfg) for _ in range(cfg.vision_layers - 1)))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [b, patches, dim]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        return self.transformer(self.pre_norm(x + self.pos_embedding))


def _unused_visual_keys(cfg: ClipVisionConfig) -> set[str]:
    """Keys of the released tower that the penultimate-layer features never read."""
    last = f"transformer.{cfg.vision_layers - 1}."
    block = ["norm1.weight", "norm1.bias", "attn.to_qkv.weight", "attn.to_qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
             "mlp.2.bias"]  # fmt: skip
    return {last + k for k in block} | {"post_norm.weight", "post_norm.bias", "head"}


class ClipVision:
    """`__call__(image [3, H, W] in [-1, 1]) -> [1, 257, width]` features (model dtype)."""

    def __init__(
        self, tower: VisionTower, cfg: ClipVisionConfig, dtype: torch.dtype, device: str | torch.device
    ):
        self.tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for module in self.tower.modules():
            if isinstance(module, LayerNorm):
                module.float()  # norms run in float32 (as under the reference's autocast), weights too
        self.config = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls,
        pth: str | Path,
        config: ClipVisionConfig | Mapping | str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> ClipVision:
        """Load the whole released CLIP file; only `visual.*` is used (`textual.*` and `log_scale` are the
        unused text tower). Every needed `visual.` key must be there and no unknown `visual.` key may be."""
        pth = Path(pth)
        state = load_pth(pth)
        foreign = sorted(k for k in state if not k.startswith((PREFIX, TEXT_PREFIX)) and k != "log_scale")
        if foreign:
            raise CheckpointError(
                f"{pth}: unexpected key {foreign[0]!r} (a CLIP file has visual.*, textual.*, log_scale)"
            )
        visual = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
        cfg = _resolve_config(config, pth, visual)
        with torch.device("meta"):
            tower = VisionTower(cfg)
        unused = _unused_visual_keys(cfg)
        needed = {k: v for k, v in visual.items() if k not in unused}
        try:
            load_checked(tower, needed, pth)
        except CheckpointError as exc:  # name the keys as they are spelled in the file
            raise CheckpointError(str(exc).replace("key '", f"key '{PREFIX}")) from None
        return cls(tower, cfg, dtype, device)

    def to(self, device: str | torch.device) -> ClipVision:
        """Move weights and normalisation constants; returns self."""
        self.device = torch.device(device)
        self.tower.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def preprocess(self, image: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """[3, H, W] in [-1, 1] -> [1, 3, S, S] normalised: the reference's exact steps, computed in `dtype`.

        dtype None = the image's own float dtype, as in the reference, whose resize and torchvision Normalize
        run in the dtype they are handed (mean and std cast to it): bf16 on CUDA, where Animate's pixels are
        bf16 (0.6% rel-L2 from float32), float32 on the CPU fixtures. Each step rounds to `dtype` as there."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: shape {list(image.shape)}, expected [3, height, width] in [-1, 1]")
        if dtype is None:
            dtype = image.dtype if image.is_floating_point() else torch.float32
        x = image.to(device=self.device, dtype=dtype)[None]
        size = (self.config.image_size, self.config.image_size)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        return (x - self.mean.to(dtype)) / self.std.to(dtype)

    @torch.no_grad()
    def __call__(self, image: Tensor, preprocess_dtype: torch.dtype | None = None) -> Tensor:
        return self.tower(self.preprocess(image, preprocess_dtype).to(self.dtype))


def _resolve_config(
    config: ClipVisionConfig | Mapping | str | Path | None, pth: Path, visual: Mapping[str, Tensor]
) -> ClipVisionConfig:
    source: str | Path = "config"
    if config is None and (pth.parent / CONFIG_FILE).is_file():
        config = pth.parent / CONFIG_FILE
    if isinstance(config, (str, Path)):
        source = Path(config)
        config = read_json(source)
    if isinstance(config, Mapping):
        config = ClipVisionConfig.from_mapping(config, source)
    heads = config.vision_heads if config is not None else None
    inferred = ClipVisionConfig.from_state_dict(visual, pth, heads)
    if config is not None:
        for f in fields(ClipVisionConfig):
            if getattr(config, f.name) != getattr(inferred, f.name):
                raise CheckpointError(
                    f"{source}: {f.name} = {getattr(config, f.name)!r}, but {pth} has "
                    f"{getattr(inferred, f.name)!r} (read from the tensor shapes)"
                )
    if inferred.vision_dim % inferred.vision_heads:
        raise CheckpointError(
            f"{source}: vision_heads = {inferred.vision_heads} does not divide the width {inferred.vision_dim}"
        )
    return inferred
