"""The Animate-14B pipeline in one process: a preprocessed src folder + parameters -> video [3, F, H, W] in [-1, 1].

Follows the reference WanAnimate.generate (WAN_SPEC §8.8) clip by clip. It must not write files, talk to the
supervisor or decide placement across GPUs: the warm pool does that through the hooks (sp, guidance,
on_progress, should_cancel).

Relighting LoRA: read and checked by pipeline.lora, kept resident UNMERGED (A, B per Linear, ~0.7 G parameters
at 14B) and added at run time by forward hooks that exist only while a job that asked for it runs. A warm pool
thus serves jobs with and without it from one copy of the base weights, with no merge/unmerge rounding drift and
nothing to restore after a crash; the cost is two thin rank-128 matmuls per targeted Linear (about 1% of a 720p
step). This is the computation the LoRA's authors intended (a PEFT adapter, not merged).
The official generate.py never applies it: its PEFT load renames every `lora_A.default.weight` key to
`lora_A.default.default.weight` and the strict=False load drops them all, so `--use_relighting_lora` output
equals the output without it. A job asking relighting_lora="reference" gets exactly that: not applied.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from inbox_schema.defaults import DEFAULT_ANIMATE_PROMPT  # used when none is given
from inbox_schema.kinds.animate import MODES, REFERT_NUMS, RELIGHTING_REFERENCE
from pipeline.animate_conditioning import (
    LATENT_CHANNELS,
    ClipConditioning,
    Job,
    clip_conditioning,
    pack_pixel_mask,
    reference_conditioning,
)
from pipeline.animate_sources import (
    AnimateInputError,
    clip_starts,
    padded_length,
    ping_pong,
    read_sources,
)
from pipeline.i2v import DEFAULT_NEGATIVE_PROMPT, GenerationCancelled
from pipeline.sampling import FlowSolver, make_solver
from pipeline.sampling.checkpoint import CheckpointStore, SamplingState, loop_key
from pipeline.sampling.guidance import Guidance, SequentialGuidance
from pipeline.sampling.numerics import FiniteWatch, check_finite_frames

if TYPE_CHECKING:
    from pipeline.lora import BoundLora, LowRank

VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
LORA_FILE = "relighting_lora.ckpt"
FPS = 30  # the reference writes Animate videos at 30 fps whatever the source fps

# on_progress(phase, step, total, clip_index), clip_index from 0: "encoding" after each clip's VAE-encoded
# conditioning and "decoding" after each clip's VAE decode (step = that clip's number, total = clips),
# "sampling" after every denoising step (step counted across clips, total = clips x steps). A callback that
# takes only (phase, step, total), like the I2V pipeline's, is called without the clip index.
ProgressFn = Callable[[str, int, int, int], None]
CancelFn = Callable[[], bool]
Tensor = torch.Tensor


class AnimateParameterError(ValueError):
    """A generation parameter is out of range; the message names it, its value and what is expected."""


# ---------------------------------------------------------------------------------------------- models


class RelightingLora:
    """The relighting LoRA bound to the DiT (pipeline.lora), its tensors resident on the DiT's device."""

    def __init__(self, bound: BoundLora) -> None:
        self.bound = bound

    @property
    def layers(self) -> dict[str, LowRank]:
        """Targeted Linear path -> its low-rank change (A [rank, in], B [out, rank], scale alpha / rank)."""
        return {change.module: change for change in self.bound.low_rank}

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module, device: torch.device,
             dtype: torch.dtype) -> RelightingLora:
        """Read relighting_lora.ckpt (or a PEFT adapter file) and check every key against `model`."""
        from pipeline.lora import LoraError, bind_lora, read_lora

        try:
            # alpha = rank in the release (PEFT scale alpha / r = 1); the file does not carry alpha
            bound = bind_lora(read_lora(path), model, 1.0)
        except LoraError as exc:
            raise AnimateInputError(str(exc)) from exc
        return cls(bound.to(device, dtype))

    @contextmanager
    def applied(self, model: nn.Module, device: torch.device) -> Iterator[None]:
        """While inside, every targeted Linear returns W x + b + scale * B (A x); hooks are removed on exit.

        Compiled blocks run eagerly meanwhile (hooks that come and go per job would otherwise recompile each
        block). The pool loads the DiT with separate q/k/v when the LoRA is resident (pipeline/families/animate.py),
        and a fused DiT is refused here; pipeline.lora.hook_loras itself reaches fused q/k/v, so lifting
        this refusal (and its test) lets the pool fuse them.
        """
        from pipeline.lora import hook_loras
        from pipeline.models.fast import fused_blocks

        if fused_blocks(model):
            raise RuntimeError("relighting LoRA: the DiT's self-attention q/k/v are fused, which would skip their "
                               "LoRA; load with optimize(model, fuse_qkv=False) when the LoRA is resident")
        if any(c.down.device != device for c in self.bound.low_rank):  # e.g. loaded on the CPU before FSDP
            self.bound = self.bound.to(device)
        with hook_loras(model, [self.bound], eager=True):
            yield


@dataclass
class AnimateModels:
    """Everything Animate-14B needs, loaded once and kept resident: DiT, VAE, CLIP, text encoder, optional LoRA."""

    dit: nn.Module
    vae: Any
    clip: Any
    text_encoder: Any | None
    device: torch.device
    dtype: torch.dtype
    relighting: RelightingLora | None = None

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, relighting_lora: bool = False, *,
             text_encoder: bool = True) -> AnimateModels:
        """Load from a released Animate-14B directory (WAN_SPEC §1.2). The VAE runs in float32; CLIP in float16
        on CUDA with half-precision weights (as the reference), else float32. relighting_lora=True keeps the
        LoRA resident (unmerged): jobs then use it unless they say relighting_lora=False."""
        from pipeline.models.clip import ClipVision
        from pipeline.models.t5 import TextEncoder
        from pipeline.models.vae import WanVAE
        from pipeline.weights.loader import load_animate_dit

        root, device = Path(ckpt_dir), torch.device(device)
        dit = load_animate_dit(root, dtype=dtype, device=device)
        vae = WanVAE.from_checkpoint(root / VAE_FILE, device=device)
        clip_dtype = torch.float16 if device.type == "cuda" and dtype != torch.float32 else torch.float32
        clip = ClipVision.from_checkpoint(root / CLIP_FILE, dtype=clip_dtype, device=device)
        encoder = TextEncoder(root, dtype=dtype, device=device) if text_encoder else None
        lora = None
        if relighting_lora:
            if not (root / LORA_FILE).is_file():
                raise AnimateInputError(f"{root / LORA_FILE}: missing; the Animate-14B release has it "
                                        f"(re-download the checkpoint or load with relighting_lora=False)")
            lora = RelightingLora.load(root / LORA_FILE, dit, device, dtype)
        return cls(dit, vae, clip, encoder, device, dtype, lora)

    @property
    def face_size(self) -> int:
        """Side of the face crops the motion encoder takes (512 for the released model)."""
        return int(self.dit.config.motion.input_size)


# ---------------------------------------------------------------------------------------------- parameters


def check_parameters(mode: str, clip_len: int, refert_num: int, guide_scale: float, seed: int) -> None:
    if mode not in MODES:
        raise AnimateParameterError(f"mode: got {mode!r}, expected 'animation' or 'replacement'")
    if refert_num not in REFERT_NUMS or isinstance(refert_num, bool):
        raise AnimateParameterError(f"refert_num: got {refert_num!r}, expected 1 or 5 (frames carried from one "
                                    f"clip to the next)")
    if isinstance(clip_len, bool) or not isinstance(clip_len, int) or clip_len < 5 or (clip_len - 1) % 4:
        raise AnimateParameterError(f"clip_len: got {clip_len!r}, expected 4n+1 >= 5, e.g. 77")
    if clip_len < refert_num + 4:
        raise AnimateParameterError(f"clip_len: got {clip_len}, expected at least refert_num + 4 = "
                                    f"{refert_num + 4} (each clip must add new frames)")
    if not isinstance(guide_scale, (int, float)) or not np.isfinite(guide_scale) or guide_scale <= 0:
        raise AnimateParameterError(f"guide_scale: got {guide_scale!r}, expected a number > 0 (1 = no guidance)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise AnimateParameterError(f"seed: got {seed!r}, expected an integer in [0, 2**63) "
                                    f"(a random seed is chosen and recorded before the job runs)")


def check_sequence_parallel(tokens: int, grid: tuple[int, int, int], sp: Any | None, num_heads: int) -> None:
    """The face adapter groups tokens by latent frame, so the token count must divide by the world size (no
    padding); Ulysses gives every rank whole heads, so the head count must too. Checked before any work."""
    world = getattr(sp, "world_size", 1) if sp is not None else 1
    if tokens % world == 0 and num_heads % world == 0:
        return
    works = [n for n in range(1, num_heads + 1) if num_heads % n == 0 and tokens % n == 0]
    raise AnimateParameterError(
        f"sequence parallel: world size {world} must divide both the {tokens} tokens per clip (latent frames x "
        f"rows x cols = {grid[0]} x {grid[1]} x {grid[2]}) and the model's {num_heads} attention heads; world "
        f"sizes that work for this video: {', '.join(map(str, works))}"
    )


def _autocast(models: AnimateModels) -> Any:
    # bf16/fp16 weights run under autocast like the reference; float32 stays exact (tests, CPU).
    enabled = models.dtype != torch.float32 and models.device.type == "cuda"
    return torch.autocast(device_type=models.device.type, dtype=models.dtype, enabled=enabled)


# ---------------------------------------------------------------------------------------------- generation


def encode_prompts(models: AnimateModels, prompt: str | Tensor | None,
                   negative_prompt: str | Tensor | None) -> tuple[Tensor, Tensor]:
    """(context, context_null): embeddings [L, text_dim] pass through; text goes through the text encoder.
    An empty prompt is the reference's fixed Animate prompt, an empty negative prompt its default one."""
    pair = [_or_default(prompt, DEFAULT_ANIMATE_PROMPT), _or_default(negative_prompt, DEFAULT_NEGATIVE_PROMPT)]
    texts = [p for p in pair if isinstance(p, str)]
    if texts and models.text_encoder is None:
        raise AnimateParameterError("prompt: text was given but the models were loaded without a text encoder; "
                                    "load with text_encoder=True or pass prompt embeddings")
    encoded = iter(models.text_encoder(texts) if texts else [])
    out = [next(encoded) if isinstance(p, str) else p for p in pair]
    return out[0].to(models.device), out[1].to(models.device)


def _or_default(prompt: str | Tensor | None, default: str) -> str | Tensor:
    if isinstance(prompt, Tensor):
        if prompt.dim() != 2:
            raise AnimateParameterError(f"prompt: got an embedding of shape {list(prompt.shape)}, expected "
                                        f"[tokens, text_dim] (one prompt's text encoder output)")
        return prompt
    return prompt or default


def relighting_applies(choice: bool | str | None) -> bool:
    """Whether a job's relighting_lora choice applies a resident LoRA: None (the default) and True do,
    False does not, and "reference" does not either, as in the official code (module docstring)."""
    return choice is None or choice is True


def describe_relighting(choice: bool | str | None, resident: bool) -> str:
    """For the sidecar: "applied", "off", or "reference: not applied, as the official generate.py"."""
    if choice == RELIGHTING_REFERENCE:
        return "reference: not applied, as the official generate.py (its PEFT load drops every key)"
    return "applied" if resident and relighting_applies(choice) else "off"


def generate_animate(
    models: AnimateModels, src_dir: str | os.PathLike[str], *, mode: str, prompt: str | Tensor | None = None,
    negative_prompt: str | Tensor | None = None, clip_len: int = 77, refert_num: int = 1, steps: int = 20,
    shift: float = 5.0, guide_scale: float = 1.0, solver: str = "unipc", timesteps: Sequence[int] | None = None,
    seed: int, relighting_lora: bool | str | None = None, on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    sp: Any | None = None, guidance: Guidance | None = None, noise: Sequence[Tensor] | None = None,
    checkpoint: CheckpointStore | None = None, on_frames: Callable[[Tensor], None] | None = None,
) -> Tensor | None:
    """Preprocessed src folder -> video [3, frames of src_pose.mp4, H, W] float32 on the CPU, in [-1, 1].

    on_frames: handed each clip's new frames (on the models' device) as soon as the clip is decoded, the last
    clip's cut to the video's length, so that they can be encoded while the next clip samples; then the video
    is not kept and None is returned.

    mode 'animation' or 'replacement' (the latter also reads src_bg.mp4 / src_mask.mp4). guide_scale <= 1
    runs one forward per step; > 1 mixes in an unconditional branch (negative prompt and a black face).
    noise: the initial latent of every clip [16, (clip_len-1)/4 + 2, H/8, W/8] instead of drawing them from one
    generator seeded with `seed` on models.device (e.g. to replay a reference run made on another device).
    relighting_lora: True/False per job; None = whatever the models were loaded with; "reference" = as the
    official generate.py, whose PEFT load drops every key of the LoRA: not applied (module docstring).
    timesteps: solver "euler" only, an explicit list (e.g. a distilled model's [1000, 750, 500, 250]), used for
    every clip.
    checkpoint: resume from its state (the clip and step it holds; earlier clips are decoded again from their
    saved latents) and save as its policy says; the caller clears it once the video is safe.
    Raises GenerationCancelled when should_cancel() answers True at a step boundary, NonFiniteError when a
    latent or a decoded frame holds a NaN/Inf (naming the clip and step)."""
    check_parameters(mode, clip_len, refert_num, guide_scale, seed)
    make_solver(solver, steps, shift, timesteps)  # parameter errors before any heavy work
    if relighting_lora not in (None, True, False, RELIGHTING_REFERENCE):
        raise AnimateParameterError(f"relighting_lora: got {relighting_lora!r}; expected true, false or "
                                    f"{RELIGHTING_REFERENCE!r} (as the official code: not applied)")
    if relighting_lora is True and models.relighting is None:
        raise AnimateParameterError("relighting_lora: the job asks for it but the models were loaded without it "
                                    "(AnimateModels.load(..., relighting_lora=True))")
    sources = read_sources(src_dir, mode, models.face_size)
    target = padded_length(sources.frames, clip_len, refert_num)
    cond_dtype = models.dtype if models.device.type == "cuda" else torch.float32
    job = Job(models, sources, mode, clip_len, refert_num, ping_pong(sources.frames, target), cond_dtype)
    lat_h, lat_w = job.latent_hw
    grid = ((clip_len - 1) // 4 + 2, lat_h // 2, lat_w // 2)  # + 1 latent frame for the reference
    check_sequence_parallel(grid[0] * grid[1] * grid[2], grid, sp, models.dit.config.num_heads)
    context, context_null = encode_prompts(models, prompt, negative_prompt)
    generator = torch.Generator(device=models.device).manual_seed(seed)  # one stream for the whole video
    starts = clip_starts(target, clip_len, refert_num)
    _check_noise(noise, len(starts), (LATENT_CHANNELS, grid[0], lat_h, lat_w))
    loop = _ClipLoop(job, starts, steps, shift, solver, timesteps, guide_scale, context, context_null, generator,
                     on_progress, should_cancel, sp, guidance or SequentialGuidance(), noise, checkpoint)
    use_lora = models.relighting is not None and relighting_applies(relighting_lora)
    lora = models.relighting.applied(models.dit, models.device) if models.relighting and use_lora else _nothing()
    with torch.no_grad(), lora:
        return loop.run(sources.frames, on_frames)


def _check_noise(noise: Sequence[Tensor] | None, clips: int, shape: tuple[int, ...]) -> None:
    if noise is None:
        return
    if len(noise) != clips:
        raise AnimateParameterError(f"noise: got {len(noise)} tensors, expected one per clip ({clips} clips)")
    for i, tensor in enumerate(noise):
        if tuple(tensor.shape) != shape:
            raise AnimateParameterError(f"noise[{i}]: got shape {list(tensor.shape)}, expected {list(shape)}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _with_clip_index(fn: Callable[..., None]) -> ProgressFn:
    """fn itself if it takes (phase, step, total, clip_index), else a wrapper that drops the clip index."""
    try:
        inspect.signature(fn).bind("sampling", 1, 1, 0)
    except TypeError:
        return lambda phase, step, total, _clip: fn(phase, step, total)
    except ValueError:  # no signature to read (some builtins): assume the full form
        pass
    return fn


class _ClipLoop:
    """Sample, decode and chain the clips; holds what stays fixed across clips."""

    def __init__(self, job: Job, starts: list[int], steps: int, shift: float, solver: str,
                 timesteps: Sequence[int] | None, guide_scale: float, context: Tensor, context_null: Tensor,
                 generator: torch.Generator, on_progress: ProgressFn | None, should_cancel: CancelFn | None,
                 sp: Any | None, guidance: Guidance, noise: Sequence[Tensor] | None = None,
                 checkpoint: CheckpointStore | None = None) -> None:
        self.job, self.starts, self.steps, self.shift, self.solver = job, starts, steps, shift, solver
        self.timesteps = timesteps
        self.scale = float(guide_scale) if guide_scale > 1 else 1.0  # the reference: CFG only when > 1
        self.context, self.context_null, self.generator = context, context_null, generator
        self.on_progress = _with_clip_index(on_progress) if on_progress is not None else None
        self.should_cancel, self.sp, self.guidance = should_cancel, sp, guidance
        self.total = len(starts) * steps
        self.noise, self.checkpoint = noise, checkpoint
        self.finished: list[Tensor] = []  # final latent of each clip so far, for the checkpoints (writer only)
        self.resumed_solver: FlowSolver | None = None

    def run(self, length: int, on_frames: Callable[[Tensor], None] | None = None) -> Tensor | None:
        """The video's first `length` frames, clip by clip: handed to `on_frames`, or kept and returned."""
        models, job = self.job.models, self.job
        y_ref, clip_fea = reference_conditioning(job)
        resume = self.resume()
        pieces: list[Tensor] = []
        tail: Tensor | None = None
        emitted = 0
        for index, start in enumerate(self.starts):
            if resume is not None and index < resume.clip:  # sampled before the interruption: decode it again
                latent = resume.finished[index].to(models.device)
            else:
                cond = clip_conditioning(job, start, index == 0, y_ref, tail)
                self._report("encoding", index + 1, len(self.starts), index)
                latent = self.sample(index, cond, clip_fea, resume if resume and resume.clip == index else None)
            if self.checkpoint is not None and self.checkpoint.writer:
                self.finished.append(latent.cpu())
            frames = models.vae.decode(latent[:, 1:]).clamp(-1, 1)  # drop the reference latent frame
            check_finite_frames(frames, clip=index, clips=len(self.starts))
            if index:
                frames = frames[:, job.refert_num :]  # these frames repeat the previous clip's tail
            # The next clip starts with the last refert_num frames of the video so far. That is this clip's
            # tail, as in the reference, unless a clip adds fewer new frames than it carries over
            # (clip_len < 2 * refert_num), where the reference breaks and older frames fill the rest.
            tail = frames if tail is None else torch.cat([tail, frames], dim=1)
            tail = tail[:, -job.refert_num :]
            frames = frames[:, : max(0, length - emitted)]  # the padding past the driving video's end goes
            emitted += frames.shape[1]
            if on_frames is None:
                pieces.append(frames.cpu())
            elif frames.shape[1]:
                on_frames(frames)
            self._report("decoding", index + 1, len(self.starts), index)
        return torch.cat(pieces, dim=1) if on_frames is None else None

    def resume(self) -> SamplingState | None:
        """The checkpoint's state for this job (generator restored, solver loaded), or None: start at clip 1."""
        if self.checkpoint is None:
            return None
        solver = self._new_solver()
        lat_h, lat_w = self.job.latent_hw
        key = loop_key("animate", solver, len(self.starts), (LATENT_CHANNELS, (self.job.clip_len - 1) // 4 + 2,
                       lat_h, lat_w), starts=self.starts, guide_scale=self.scale, mode=self.job.mode,
                       refert_num=self.job.refert_num, noise="given" if self.noise is not None else "drawn")
        state = self.checkpoint.begin(key, solver, self.job.models.device)
        if state is None:
            return None
        if state.rng is not None:  # saved after the draw for its clip: later clips draw what they would have
            self.generator.set_state(state.rng)
        self.resumed_solver = solver
        self._report("sampling", state.clip * self.steps + state.step, self.total, state.clip)
        return state

    def sample(self, index: int, cond: ClipConditioning, clip_fea: Tensor,
               resume: SamplingState | None = None) -> Tensor:
        models = self.job.models
        lat_h, lat_w = self.job.latent_hw
        shape = (LATENT_CHANNELS, cond.y.shape[1], lat_h, lat_w)
        if resume is not None and self.resumed_solver is not None:
            latent, solver, first = resume.latent.to(models.device), self.resumed_solver, resume.step
        else:
            if self.noise is not None:
                latent = self.noise[index].to(models.device, torch.float32)
            else:  # the generator's stream continues from the previous clip's draw
                latent = torch.randn(*shape, dtype=torch.float32, device=models.device, generator=self.generator)
            solver, first = self._new_solver(), 0  # fresh per clip, as the reference
        seq_len = shape[1] * lat_h * lat_w // 4

        def denoise(x: Tensor, t: Tensor, *, context: Tensor, face_pixel_values: Tensor) -> Tensor:
            return models.dit(x, t, context, seq_len, cond.y, clip_fea=clip_fea, pose_latents=cond.pose_latents,
                              face_pixel_values=face_pixel_values, sp=self.sp)

        branch = {"context": self.context, "face_pixel_values": cond.face}
        null = {"context": self.context_null, "face_pixel_values": torch.full_like(cond.face, -1.0)} \
            if self.scale != 1.0 else branch  # a black face removes the expression in the unconditional branch
        watch = FiniteWatch(self.steps, clip=index, clips=len(self.starts))
        for k in range(first, self.steps):
            done = index * self.steps + k
            if self.should_cancel is not None and self.should_cancel():
                raise GenerationCancelled(f"cancelled before sampling step {done + 1} of {self.total} "
                                          f"(clip {index + 1} of {len(self.starts)})")
            t = solver.timesteps[k : k + 1].to(models.device)
            with _autocast(models):
                v = self.guidance(denoise, latent, t, branch, null, self.scale)
            latent = solver.step(v.float(), k, latent)
            watch.observe(k, latent)
            self._save(index, k + 1, latent, solver, watch)
            self._report("sampling", done + 1, self.total, index)
        watch.check()
        return latent

    def _new_solver(self) -> FlowSolver:
        return make_solver(self.solver, self.steps, self.shift, self.timesteps)

    def _save(self, index: int, done: int, latent: Tensor, solver: FlowSolver, watch: FiniteWatch) -> None:
        store = self.checkpoint  # never a state holding a NaN/Inf: the watch raises at its next check
        if store is not None and store.tick(final=done == self.steps) and watch.finite():
            store.save(SamplingState(index, done, latent, solver.state_dict(), rng=self.generator.get_state(),
                                     finished=self.finished))

    def _report(self, phase: str, step: int, total: int, clip: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, step, total, clip)


__all__ = ["DEFAULT_ANIMATE_PROMPT", "FPS", "RELIGHTING_REFERENCE", "AnimateInputError", "AnimateModels",
           "AnimateParameterError", "GenerationCancelled", "RelightingLora", "check_sequence_parallel",
           "describe_relighting", "encode_prompts", "generate_animate", "pack_pixel_mask", "relighting_applies"]
