"""The I2V-A14B pipeline in one process: image + prompts + parameters -> video tensor [3, F, H, W] in [-1, 1].

Follows the reference WanI2V.generate (WAN_SPEC §2.9, §3) step for step. It must not write files, talk to
the supervisor or decide placement across GPUs: the warm pool does that through the hooks (sp, guidance,
on_progress, should_cancel).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inbox_schema.defaults import DEFAULT_NEGATIVE_PROMPT  # used when none is given
from pipeline.preprocess.image import latent_size, load_image
from pipeline.sampling import FlowSolver, make_solver
from pipeline.sampling.checkpoint import CheckpointStore, SamplingState, loop_key
from pipeline.sampling.guidance import Guidance, SequentialGuidance
from pipeline.sampling.moe import HIGH_NOISE, LOW_NOISE, ExpertSwitch
from pipeline.sampling.numerics import FiniteWatch, check_finite_frames

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4
PATCH_TOKENS = 4  # a (1, 2, 2) patch turns 4 latent cells into one token

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]
ImageLike = Image.Image | np.ndarray | str | os.PathLike


class GenerationCancelled(Exception):
    """should_cancel() answered True at a step boundary; nothing was produced."""


class I2VParameterError(ValueError):
    """A generation parameter is out of range; the message names it, its value and what is expected."""


@dataclass
class I2VModels:
    """Everything I2V-A14B needs, loaded once and kept resident: two experts, VAE, optional text encoder."""

    high_noise: torch.nn.Module
    low_noise: torch.nn.Module
    vae: Any
    text_encoder: Any | None
    device: torch.device
    dtype: torch.dtype
    offload_experts: bool = False  # keep only the expert in use on `device`, the other in host memory

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, *, text_encoder: bool = True,
             offload_experts: bool = False) -> I2VModels:
        """Load from a released checkpoint directory (WAN_SPEC §1.1). The VAE always runs in float32.

        offload_experts: both experts do not fit one GPU next to T5 (2 x 28.6 GB in bf16); the reference
        then swaps them between host and GPU at the boundary, once per job. Experts start in host memory.
        """
        from pipeline.models.vae import WanVAE
        from pipeline.weights.loader import load_i2v_experts

        root, device = Path(ckpt_dir), torch.device(device)
        high, low = load_i2v_experts(root, device="cpu" if offload_experts else device, dtype=dtype)
        vae = WanVAE.from_checkpoint(root / "Wan2.1_VAE.pth", device=device)
        encoder = _load_text_encoder(root, device, dtype) if text_encoder else None
        return cls(high.eval(), low.eval(), vae, encoder, device, dtype, offload_experts)

    def expert(self, name: str) -> torch.nn.Module:
        return self.high_noise if name == HIGH_NOISE else self.low_noise

    def activate(self, name: str) -> torch.nn.Module:
        """The expert for this step, on `device`; with offloading the other one goes to host memory first."""
        if self.offload_experts:
            other = self.low_noise if name == HIGH_NOISE else self.high_noise
            other.to("cpu")
            self.expert(name).to(self.device)
        return self.expert(name)


def _load_text_encoder(root: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from pipeline.models.t5 import TextEncoder

    return TextEncoder(root, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------- inputs


def check_frames(frames: int) -> int:
    """Frame counts are 4n+1 (the VAE packs 4 frames per latent frame after the first)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        raise I2VParameterError(f"frames: got {frames!r}, expected 4n+1, e.g. 81 or 17")
    return frames


def image_tensor(image: ImageLike) -> torch.Tensor:
    """PIL image, uint8 HxWx3 array or image path -> [3, h, w] float32 in [-1, 1] (to_tensor, then (x-0.5)/0.5)."""
    if isinstance(image, (str, os.PathLike)):
        image, _ = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise I2VParameterError(f"image: got {type(image).__name__} {shape}, expected an RGB PIL image, "
                                f"a uint8 HxWx3 array or an image path")
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    return pixels.sub(0.5).div(0.5)


def resize_image(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize on the CPU as the reference (align_corners False, no antialias, no clamp) -> [3, 1, H, W]."""
    return F.interpolate(pixels[None].cpu(), size=(height, width), mode="bicubic").transpose(0, 1)


def first_frame_mask(latent_frames: int, lat_h: int, lat_w: int, device: torch.device) -> torch.Tensor:
    """[4, T, h, w]: all four channels 1 at latent frame 0 (the given image), 0 elsewhere."""
    mask = torch.zeros(4, latent_frames, lat_h, lat_w, device=device)
    mask[:, 0] = 1
    return mask


def initial_noise(seed: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The reference's draw: randn on `device` from a generator of that device seeded with `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=generator, device=device)


def sequence_length(latent_frames: int, lat_h: int, lat_w: int, sp: Any | None) -> int:
    """Tokens per sample, rounded up to a multiple of the sequence-parallel size."""
    tokens = latent_frames * lat_h * lat_w // PATCH_TOKENS
    world = getattr(sp, "world_size", 1) if sp is not None else 1
    return int(math.ceil(tokens / world)) * world


@dataclass
class I2VInputs:
    """What the sampling loop needs: conditioning y [20, T, h, w], start noise, text contexts, seq_len."""

    y: torch.Tensor
    noise: torch.Tensor
    context: torch.Tensor
    context_null: torch.Tensor
    seq_len: int
    width: int
    height: int
    frames: int


def encode_image_condition(models: I2VModels, pixels: torch.Tensor, frames: int,
                           height: int, width: int) -> torch.Tensor:
    """VAE latent [16, T, h, w] of [resized image, F-1 black frames] (the mask is added separately)."""
    first = resize_image(pixels, height, width)
    video = torch.cat([first, torch.zeros(3, frames - 1, height, width)], dim=1).to(models.device)
    return models.vae.encode(video)


def encode_prompts(models: I2VModels, prompt: str | torch.Tensor,
                   negative_prompt: str | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, context_null): given embeddings pass through; text goes through the text encoder."""
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt):
        negative_prompt = DEFAULT_NEGATIVE_PROMPT
    texts = [p for p in (prompt, negative_prompt) if isinstance(p, str)]
    encoded = iter(_encode_texts(models, texts)) if texts else iter(())
    pair = [next(encoded) if isinstance(p, str) else p for p in (prompt, negative_prompt)]
    return pair[0].to(models.device), pair[1].to(models.device)


def _encode_texts(models: I2VModels, texts: list[str]) -> list[torch.Tensor]:
    if models.text_encoder is None:
        raise I2VParameterError("prompt: text was given but the models were loaded without a text encoder; "
                                "load with text_encoder=True or pass prompt embeddings")
    return list(models.text_encoder(texts))


def prepare_i2v(models: I2VModels, image: ImageLike, prompt: str | torch.Tensor,
                negative_prompt: str | torch.Tensor | None, *, max_area: int, frames: int, seed: int,
                sp: Any | None = None, noise: torch.Tensor | None = None) -> I2VInputs:
    """Size, conditioning latent, noise and text contexts, as WanI2V.generate builds them (§2.9)."""
    check_frames(frames)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise I2VParameterError(f"seed: got {seed!r}, expected an integer in [0, 2**63) "
                                f"(a random seed is chosen and recorded before the job runs)")
    pixels = image_tensor(image)
    lat_h, lat_w = latent_size(pixels.shape[2], pixels.shape[1], max_area)
    height, width, latent_frames = lat_h * 8, lat_w * 8, (frames - 1) // TEMPORAL_STRIDE + 1
    shape = (LATENT_CHANNELS, latent_frames, lat_h, lat_w)
    if noise is None:
        noise = initial_noise(seed, shape, models.device)
    elif tuple(noise.shape) != shape:
        raise I2VParameterError(f"noise: got shape {list(noise.shape)}, expected {list(shape)}")
    context, context_null = encode_prompts(models, prompt, negative_prompt)
    with torch.no_grad():
        image_latent = encode_image_condition(models, pixels, frames, height, width)
    mask = first_frame_mask(latent_frames, lat_h, lat_w, models.device)
    y = torch.cat([mask, image_latent.to(mask.dtype)], dim=0)
    return I2VInputs(y, noise.to(models.device, torch.float32), context, context_null,
                     sequence_length(latent_frames, lat_h, lat_w, sp), width, height, frames)


# ---------------------------------------------------------------------------------------------- sampling


def sample_i2v(models: I2VModels, inputs: I2VInputs, solver: FlowSolver, switch: ExpertSwitch, *,
               guidance: Guidance | None = None, sp: Any | None = None,
               on_progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
               on_latent: Callable[[int, torch.Tensor], None] | None = None,
               checkpoint: CheckpointStore | None = None) -> torch.Tensor:
    """The denoising loop: per step choose the expert and its scale, guided velocity, solver step.

    on_latent(step_index, latent) sees the latent after every step (checks, previews). checkpoint: continue
    from its state if it holds one for this job, and save the state as its policy says (default: none, the
    loop starts at step 0). Raises NonFiniteError naming the first step whose latent holds a NaN/Inf."""
    guide = guidance or SequentialGuidance()
    latent, total, start = inputs.noise, solver.num_steps, 0
    if checkpoint is not None:
        state = checkpoint.begin(i2v_loop_key(inputs, solver, switch), solver, models.device)
        if state is not None:
            latent, start = state.latent.to(models.device), state.step
            if on_progress is not None:
                on_progress("sampling", start, total)
    watch = FiniteWatch(total, expert_of=lambda k: switch.expert(int(solver.timesteps[k])))
    for index in range(start, total):
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled(f"cancelled before sampling step {index + 1} of {total}")
        step_t = int(solver.timesteps[index])  # decisions on the host copy: no device sync
        t = solver.timesteps[index : index + 1].to(models.device)  # int64 [1], as the reference feeds it
        name = switch.expert(step_t)
        denoise = _denoiser(models, name, inputs, sp)
        with torch.no_grad(), _autocast(models):
            v = guide(denoise, latent, t, {"context": inputs.context}, {"context": inputs.context_null},
                      switch.scale(step_t))
        latent = solver.step(v.float(), index, latent)
        watch.observe(index, latent)
        # never save a state holding a NaN/Inf: the watch raises at its next check, on every rank alike
        if checkpoint is not None and checkpoint.tick(final=index + 1 == total) and watch.finite():
            checkpoint.save(SamplingState(0, index + 1, latent, solver.state_dict(), expert=name))
        if on_latent is not None:
            on_latent(index, latent)
        if on_progress is not None:
            on_progress("sampling", index + 1, total)
    watch.check()
    return latent


def i2v_loop_key(inputs: I2VInputs, solver: FlowSolver, switch: ExpertSwitch) -> dict[str, Any]:
    """What a checkpoint must agree with besides the job's fingerprint: the schedule, the switch, the shape."""
    return loop_key("i2v", solver, 1, inputs.noise.shape, boundary=switch.boundary,
                    guide_scale=list(switch.guide_scale))


def _denoiser(models: I2VModels, name: str, inputs: I2VInputs, sp: Any | None) -> Callable[..., torch.Tensor]:
    expert = models.activate(name)

    def denoise(latent: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        return expert(latent, t, context, inputs.seq_len, inputs.y, sp=sp)

    return denoise


def _autocast(models: I2VModels) -> Any:
    # bf16/fp16 weights run under autocast like the reference; float32 stays exact (fixtures, CPU).
    enabled = models.dtype != torch.float32 and models.device.type == "cuda"
    return torch.autocast(device_type=models.device.type, dtype=models.dtype, enabled=enabled)


def decode_video(models: I2VModels, latent: torch.Tensor) -> torch.Tensor:
    """VAE decode -> [3, F, H, W] clamped to [-1, 1]; NonFiniteError if a frame holds a NaN/Inf."""
    with torch.no_grad():
        video = models.vae.decode(latent).clamp(-1, 1)
    check_finite_frames(video)
    return video


def generate_i2v(models: I2VModels, image: ImageLike, prompt: str | torch.Tensor,
                 negative_prompt: str | torch.Tensor | None, *, max_area: int, frames: int, steps: int,
                 shift: float, guide_scale: float | tuple[float, float], solver: str, seed: int,
                 boundary: float = 0.9, on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None, sp: Any | None = None, guidance: Guidance | None = None,
                 noise: torch.Tensor | None = None, timesteps: Sequence[int] | None = None,
                 checkpoint: CheckpointStore | None = None) -> torch.Tensor:
    """Image + prompt (text or embedding [L, text_dim]) -> video [3, F, H, W] in [-1, 1] on models.device.

    guide_scale is one number or (low-noise, high-noise); boundary is the fraction of 1000 at and above
    which the high-noise expert runs; timesteps is an explicit list for solver 'euler' (distilled presets);
    checkpoint: resume from / save the sampling state (see sample_i2v); the caller clears it once the video
    is safe.
    """
    switch = ExpertSwitch(boundary=boundary, guide_scale=guide_scale)
    sampler = make_solver(solver, steps, shift, timesteps)
    inputs = prepare_i2v(models, image, prompt, negative_prompt, max_area=max_area, frames=frames,
                         seed=seed, sp=sp, noise=noise)
    if on_progress is not None:
        on_progress("encoding", 1, 1)
    latent = sample_i2v(models, inputs, sampler, switch, guidance=guidance, sp=sp,
                        on_progress=on_progress, should_cancel=should_cancel, checkpoint=checkpoint)
    video = decode_video(models, latent)
    if on_progress is not None:
        on_progress("decoding", 1, 1)
    return video


__all__ = ["DEFAULT_NEGATIVE_PROMPT", "GenerationCancelled", "I2VInputs", "I2VModels", "I2VParameterError",
           "LOW_NOISE", "HIGH_NOISE", "decode_video", "generate_i2v", "prepare_i2v", "sample_i2v"]
