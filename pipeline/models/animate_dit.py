"""The Wan2.2 Animate-14B DiT (WanAnimateModel): the I2V backbone plus pose, face-motion and image conditioning.

Must not change the reference function (WAN_SPEC §8.2-8.5) nor hard-code widths that the checkpoint carries.

Call convention (batch of one; keywords for the Animate inputs):
    out = model(x, t, context, seq_len, y, clip_fea=..., pose_latents=..., face_pixel_values=..., sp=None)
x [16, T, H, W] (latent frame 0 = reference frame; a list of one gives a list of one back), t int64 [1],
context [Lc, text_dim], y [20, T, H, W], clip_fea [1, 257, clip_dim] (CLIP penultimate tokens),
pose_latents [16, T-1, H, W] (or [1, 16, T-1, H, W]), face_pixel_values [1, 3, F, S, S] in [-1, 1]
(F face frames, S = motion encoder input size; all -1 for the unconditional branch). seq_len = T*H*W/4.
Returns [16, T, H, W] float32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.dit import DiTConfig, LayerNorm32, SequenceParallel, WanDiT, _keep, _one, linear
from pipeline.models.face_blocks import FaceAdapter, FaceEncoder
from pipeline.models.motion_encoder import MotionEncoder, MotionEncoderSpec

Tensor = torch.Tensor
FACE_BLOCK_EVERY = 5  # a face adapter follows blocks 0, 5, 10, ...
MOTION_BATCH = 8  # face crops per motion-encoder call (the reference's batch; bounds activation memory)


@dataclass(frozen=True)
class AnimateConfig(DiTConfig):
    """WanAnimateModel's config.json fields plus the widths only the checkpoint's shapes tell."""

    motion_encoder_dim: int = 512
    use_context_parallel: bool = False  # accepted from config.json; sequence parallel is the `sp` argument here
    use_img_emb: bool = True
    clip_dim: int = 1280
    pose_dim: int = 16
    face_inner_dim: int = 1024
    face_heads: int = 4
    num_face_blocks: int = 8
    motion: MotionEncoderSpec = field(default_factory=MotionEncoderSpec.real)

    @classmethod
    def real_14b(cls) -> AnimateConfig:
        return cls()

    @classmethod
    def from_checkpoint(cls, config_json: Path | str, shapes: dict[str, tuple[int, ...]]) -> AnimateConfig:
        """config.json for the backbone; tensor shapes for the motion/face/image widths."""
        path = Path(config_json)
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the model config: {exc}") from exc
        base = cls.from_dict(raw, str(path))
        try:
            conv1 = shapes["face_encoder.conv1_local.conv.weight"]
            inner = shapes["face_encoder.conv2.conv.weight"][0]
            widths = dict(
                clip_dim=shapes["img_emb.proj.1.weight"][1] if base.use_img_emb else base.clip_dim,
                pose_dim=shapes["pose_patch_embedding.weight"][1],
                face_inner_dim=inner,
                face_heads=conv1[0] // inner,
                motion_encoder_dim=conv1[1],
            )
        except KeyError as exc:
            raise ValueError(f"{path.parent}: checkpoint lacks {exc.args[0]!r}; not a Wan Animate DiT") from exc
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"face_adapter\.fuser_blocks\.(\d+)\.", k))}
        config = replace(base, **widths, num_face_blocks=len(blocks), motion=MotionEncoderSpec.from_shapes(shapes))
        config.validate(str(path))
        return config


class ImageEmbedding(nn.Module):
    """img_emb.proj: LayerNorm, Linear, GELU, Linear, LayerNorm (eps 1e-5) from CLIP width to dim."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm32(clip_dim, 1e-5, affine=True), nn.Linear(clip_dim, clip_dim), nn.GELU(),
            nn.Linear(clip_dim, dim), LayerNorm32(dim, 1e-5, affine=True),
        )  # fmt: skip

    def forward(self, clip_fea: Tensor) -> Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        return norm_out(linear(fc2, act(linear(fc1, norm_in(clip_fea.float())))))


class WanAnimateDiT(WanDiT):
    """WanAnimateModel: backbone keys as WanDiT, plus pose_patch_embedding, img_emb, motion/face encoders,
    face adapter, and image K/V in every block's cross-attention."""

    def __init__(self, config: AnimateConfig) -> None:
        super().__init__(config, image_attention=config.use_img_emb)
        self.config: AnimateConfig = config
        p = config.patch_size
        self.pose_patch_embedding = nn.Conv3d(config.pose_dim, config.dim, p, stride=p)
        if config.use_img_emb:
            self.img_emb = ImageEmbedding(config.clip_dim, config.dim)
        self.motion_encoder = MotionEncoder(config.motion)
        self.face_encoder = FaceEncoder(config.motion_encoder_dim, config.face_inner_dim, config.face_heads, config.dim)
        self.face_adapter = FaceAdapter(config.dim, config.num_heads, config.num_face_blocks)

    def forward(  # type: ignore[override]
        self,
        x: Tensor | list[Tensor],
        t: Tensor,
        context: Tensor | list[Tensor],
        seq_len: int,
        y: Tensor | list[Tensor] | None = None,
        *,
        clip_fea: Tensor | None = None,
        pose_latents: Tensor | list[Tensor],
        face_pixel_values: Tensor,
        sp: SequenceParallel | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Tensor | list[Tensor]:
        as_list = isinstance(x, (list, tuple))
        latent = _one(x, "x")
        if y is not None:
            latent = torch.cat([latent, _one(y, "y").to(latent.dtype)], dim=0)
        if latent.shape[0] != self.config.in_dim:
            raise ValueError(f"x and y together have {latent.shape[0]} channels; the model expects {self.config.in_dim}")
        patches = self.embed_patches(latent, record)
        patches = self.add_pose(patches, pose_latents, record)
        grid = tuple(patches.shape[2:])
        num_tokens = grid[0] * grid[1] * grid[2]
        if sp is not None and num_tokens % sp.world_size:
            raise ValueError(
                f"Animate needs the token count to divide by the sequence-parallel size: {num_tokens} tokens "
                f"(grid {list(grid)}) over {sp.world_size} ranks; choose a size whose latent grid divides"
            )
        motion_vec = self.face_tokens(face_pixel_values, grid[0], record)
        image_context = self.embed_image(clip_fea, record)

        def face_adapter(i: int, h: Tensor) -> Tensor:
            k = i // FACE_BLOCK_EVERY
            if i % FACE_BLOCK_EVERY or k >= len(self.face_adapter.fuser_blocks):
                return h
            residual = self.face_adapter.fuser_blocks[k](h, motion_vec, num_tokens, sp)
            _keep(record, f"face_adapter{k}", residual, sp)
            return h + residual.float()

        tokens = patches.flatten(2).transpose(1, 2)
        out = self.transformer(tokens, grid, t, context, seq_len, sp, image_context, face_adapter, record)
        video = self.unpatchify(out, grid)
        return [video] if as_list else video

    # -- conditioning -----------------------------------------------------------------------------------

    def add_pose(self, patches: Tensor, pose_latents: Tensor | list[Tensor], record: dict | None) -> Tensor:
        """Pose patch embedding added to latent frames 1.. (frame 0 is the reference image, no pose)."""
        pose = _one(pose_latents, "pose_latents")
        pose = pose[0] if pose.dim() == 5 else pose
        frames = patches.shape[2] - 1
        if pose.dim() != 4 or pose.shape[0] != self.config.pose_dim or pose.shape[1] != frames:
            raise ValueError(
                f"pose_latents has shape {tuple(pose.shape)}; expected [{self.config.pose_dim}, {frames}, H, W] "
                f"(one latent frame fewer than x)"
            )
        w = self.pose_patch_embedding.weight
        pose_emb = self.pose_patch_embedding(pose[None].to(w.dtype))
        _keep(record, "pose_patch_embedding", pose_emb)
        if pose_emb.shape[3:] != patches.shape[3:]:
            raise ValueError(f"pose_latents spatial size {list(pose.shape[2:])} differs from x's")
        return torch.cat([patches[:, :, :1], patches[:, :, 1:] + pose_emb], dim=2)

    def face_tokens(self, faces: Tensor, latent_frames: int, record: dict | None) -> Tensor:
        """Face crops [1, 3, F, S, S] -> motion tokens [1, latent_frames, heads+1, dim] (frame 0 all zero)."""
        if faces.dim() != 5 or faces.shape[0] != 1:
            raise ValueError(f"face_pixel_values has shape {tuple(faces.shape)}; expected [1, 3, frames, S, S]")
        crops = faces[0].transpose(0, 1)  # [F, 3, S, S]
        motion = torch.cat([self.motion_encoder.get_motion(chunk) for chunk in crops.split(MOTION_BATCH)])
        _keep(record, "motion_encoder_get_motion", motion)
        encoded = self.face_encoder(motion[None])  # [1, T', heads+1, dim]
        _keep(record, "face_encoder", encoded)
        if encoded.shape[1] + 1 != latent_frames:
            raise ValueError(
                f"{faces.shape[2]} face frames give {encoded.shape[1]} face steps, but x has {latent_frames} latent "
                f"frames (needs {latent_frames - 1} face steps, e.g. {4 * (latent_frames - 1) - 3} face frames)"
            )
        return F.pad(encoded, (0, 0, 0, 0, 1, 0))  # zero entry for the reference frame

    def embed_image(self, clip_fea: Tensor | None, record: dict | None) -> Tensor | None:
        if not self.config.use_img_emb:
            return None
        if clip_fea is None:
            raise ValueError("clip_fea is required: this Animate model attends to CLIP image tokens")
        clip = clip_fea[None] if clip_fea.dim() == 2 else clip_fea
        if clip.dim() != 3 or clip.shape[0] != 1 or clip.shape[2] != self.config.clip_dim:
            raise ValueError(f"clip_fea has shape {tuple(clip_fea.shape)}; expected [1, tokens, {self.config.clip_dim}]")
        out = self.img_emb(clip)
        _keep(record, "img_emb", out)
        return out


# ---------------------------------------------------------------------------------------------- relighting LoRA


def merge_lora(model: nn.Module, lora_state: dict[str, Tensor], alpha: float | None = None) -> list[str]:
    """Merge a LoRA into the Linear weights in place: W <- W + (alpha/rank) * B @ A, in fp32 then cast back.

    Merged rather than applied at run time because the relighting LoRA targets 480 Linears of the 14B
    model: an unmerged adapter costs two extra matmuls per Linear on every step, a merge costs nothing
    after loading. (Rounding differs slightly from the reference's unmerged bf16 computation.)
    Keys: `blocks.N.<path>.lora_A.default.weight` / `lora_B` (relighting_lora.ckpt) or the PEFT layout
    `base_model.model.blocks.N.<path>.lora_A.weight`. Rank from A's shape; alpha defaults to the rank
    (scale 1, as released). Returns the merged module paths. Keep an unmerged copy to undo it.
    """
    pairs = _lora_pairs(lora_state)
    modules = dict(model.named_modules())
    merged = []
    for path, (a, b) in pairs.items():
        layer = modules.get(path)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"LoRA key {path}.lora_A: the model has no Linear layer {path!r}")
        rank = a.shape[0]
        if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
            raise ValueError(
                f"LoRA {path}: A {list(a.shape)} / B {list(b.shape)} do not fit Linear({layer.in_features}, "
                f"{layer.out_features}); expected A [rank, {layer.in_features}], B [{layer.out_features}, rank]"
            )
        scale = (alpha if alpha is not None else rank) / rank
        with torch.no_grad():
            w = layer.weight
            delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
            w.copy_((w.float() + scale * delta).to(w.dtype))
        merged.append(path)
    return merged


def _lora_pairs(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        m = pattern.match(key)
        if m is None:
            raise ValueError(f"LoRA key {key!r} is not '<module>.lora_A[.default].weight' or '...lora_B...'")
        found.setdefault(m.group(1), {})[m.group(2)] = tensor
    incomplete = [p for p, ab in found.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"LoRA module {incomplete[0]!r} lacks its lora_A or lora_B weight")
    if not found:
        raise ValueError("LoRA state dict is empty")
    return {p: (ab["A"], ab["B"]) for p, ab in found.items()}


def lora_targets(model: nn.Module) -> Iterable[str]:
    """The Linears the released relighting LoRA targets: in `blocks`, not face or modulation layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "blocks" in name and "face" not in name and "modulation" not in name:
            yield name
