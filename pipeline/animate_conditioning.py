"""The Animate conditioning of one clip: the reference's latent and CLIP features, the clip's pose latents, face
pixels and the temporal/background part of y, computed from the decoded src videos as the reference does.

Pure tensor code on loaded models (pipeline/animate.py runs the loop); it must not sample or read files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.animate_sources import AnimateSources

if TYPE_CHECKING:
    from pipeline.animate import AnimateModels

Tensor = torch.Tensor
LATENT_CHANNELS = 16
MASK_CHANNELS = 4  # pixel frames packed per latent frame


# ---------------------------------------------------------------------------------------------- pixels


def _lut(divisor: float, offset: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # uint8 -> value computed in float64 then rounded once, as the reference's numpy arithmetic.
    return (torch.arange(256, dtype=torch.float64) / divisor - offset).to(dtype).to(device)


def video_pixels(frames: np.ndarray, indices: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """uint8 [N, H, W, 3] at `indices` -> [3, len, H, W] in [-1, 1] (x / 127.5 - 1), frame by frame."""
    lut = _lut(127.5, 1.0, dtype, device)
    out = [lut[torch.from_numpy(frames[i]).to(device).long()].permute(2, 0, 1) for i in indices]
    return torch.stack(out, dim=1)


def mask_pixels(mask: np.ndarray, indices: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """uint8 [N, H, W] (channel 0 of src_mask.mp4) -> [len, H, W] = value / 255 (fractions kept, not binarised)."""
    lut = _lut(255.0, 0.0, dtype, device)
    return torch.stack([lut[torch.from_numpy(mask[i]).to(device).long()] for i in indices])


def pack_pixel_mask(pixel_mask: Tensor) -> Tensor:
    """[F, h, w] per pixel frame (F = 4n+1) -> [4, n+1, h, w] as get_i2v_mask: latent frame 0 <- pixel frame 0
    in all 4 channels; channel c of latent frame j >= 1 <- pixel frame 4(j-1)+1+c."""
    h, w = pixel_mask.shape[1:]
    frames = torch.cat([pixel_mask[:1].expand(MASK_CHANNELS, h, w), pixel_mask[1:]])
    return frames.reshape(-1, MASK_CHANNELS, h, w).transpose(0, 1)


# ---------------------------------------------------------------------------------------------- one clip


@dataclass
class ClipConditioning:
    """What the DiT gets for one clip besides the latent: y [20, T+1, h, w], pose latents, face pixels."""

    y: Tensor
    pose_latents: Tensor
    face: Tensor


@dataclass
class Job:
    """One Animate generation's fixed facts: models, decoded sources, mode, clip plan, conditioning dtype."""

    models: AnimateModels
    sources: AnimateSources
    mode: str
    clip_len: int
    refert_num: int
    indices: list[int]  # source frame of every padded frame
    cond_dtype: torch.dtype  # pixels and y in the reference's dtype (bf16 on GPU)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.sources.height // 8, self.sources.width // 8


def reference_conditioning(job: Job) -> tuple[Tensor, Tensor]:
    """(y_ref [20, 1, h, w] = ones mask + VAE latent of the letterboxed reference, CLIP features [1, 257, c])."""
    models = job.models
    ref = video_pixels(job.sources.reference[None], [0], job.cond_dtype, models.device)  # [3, 1, H, W]
    latent = models.vae.encode(ref)
    ones = torch.ones(MASK_CHANNELS, 1, *latent.shape[2:], device=models.device)
    clip_fea = models.clip(ref[:, 0]).to(job.cond_dtype)
    return torch.cat([ones, latent]).to(job.cond_dtype), clip_fea


def clip_conditioning(job: Job, start: int, first: bool, y_ref: Tensor, tail: Tensor | None) -> ClipConditioning:
    """Pose latents, face pixels and the temporal/background part of y for the clip starting at `start`.

    tail: the last refert_num frames of the video decoded so far (None for the first clip)."""
    models, src, dtype, device = job.models, job.sources, job.cond_dtype, job.models.device
    frames = job.indices[start : start + job.clip_len]
    known = 0 if first else job.refert_num  # pixel frames given by the previous clip
    pose_latents = models.vae.encode(video_pixels(src.pose, frames, dtype, device))
    face = video_pixels(src.face, frames, dtype, device)[None]
    lat_h, lat_w = job.latent_hw
    if job.mode == "animation":
        video = torch.zeros(3, job.clip_len, src.height, src.width, dtype=dtype, device=device)
        pixel_mask = torch.zeros(job.clip_len, lat_h, lat_w, dtype=dtype, device=device)
    else:
        assert src.background is not None and src.mask is not None
        video = video_pixels(src.background, frames, dtype, device)
        character = mask_pixels(src.mask, frames, dtype, device)
        # 1 = keep the background, 0 = generate the character; nearest, as the reference downsamples it.
        pixel_mask = F.interpolate((1 - character)[:, None], size=(lat_h, lat_w), mode="nearest")[:, 0]
    if known:
        assert tail is not None
        # The reference bicubic-resizes the tail to (H, W) first: the same size, so an exact identity.
        video[:, :known] = tail[:, -known:].to(dtype)
        pixel_mask[:known] = 1
    y_reft = torch.cat([pack_pixel_mask(pixel_mask).to(dtype), models.vae.encode(video).to(dtype)])
    return ClipConditioning(torch.cat([y_ref, y_reft], dim=1), pose_latents, face)
