"""The Animate-14B pool family: one DiT resident (plus CLIP, VAE; T5 on rank 0); each job = clips sampled in parallel.

Reads the resolved job's fields as they are; it must not parse parameters or restate their defaults.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inbox_schema import Job
from pipeline.families.base import (
    PHASE_NAMES,
    JobCancelled,
    JobInputError,
    Reporter,
    broadcast_prompts,
    dtype_of,
    lora_options,
    lora_stats,
    parallel_groups,
    seed_of,
    speed_up,
)
from pipeline.families.resume import run_stats
from pipeline.parallel.cfg import plan_parallel
from pipeline.sampling.checkpoint import CheckpointStore
from pipeline.video import VideoOutput


class AnimateFamily:
    """Animate-14B: one DiT resident (plus CLIP, VAE; T5 on rank 0); each job = clips sampled in parallel.

    Every rank decodes each clip, because the next clip is conditioned on the last frames of this one.
    """

    kind = "animate"
    streams_video = True  # run() takes video_out: each clip is encoded while the next one samples

    def __init__(self, args: argparse.Namespace, ranks: Any) -> None:
        self.args, self.ranks = args, ranks
        self.root = Path(args.checkpoint_dir)
        config = self.root / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config}: missing; expected an Animate-14B checkpoint directory")
        heads = int(json.loads(config.read_text()).get("num_heads", 40))
        self.plan = plan_parallel(ranks.world_size, heads, args.cfg_parallel)
        if args.sharding not in ("auto", "replicate"):
            raise ValueError(f"sharding: got {args.sharding!r}; Animate-14B runs replicated in this build "
                             "(one 17B DiT fits an 80 GB GPU in bf16): use auto or replicate")
        self.parallel = {**self.plan.as_dict(), "sharding": "replicate", "text_encoder": "rank0"}
        self.checkpoints: dict[str, str] = {}
        self.models: Any = None
        self.sp: Any = None
        self.guidance: Any = None
        self.loras: Any = None

    def load(self) -> None:
        from pipeline.animate import LORA_FILE, AnimateModels
        from pipeline.families.loras import PoolLoras

        self.models = AnimateModels.load(self.root, self.ranks.device, dtype_of(self.args),
                                         relighting_lora=(self.root / LORA_FILE).is_file(),
                                         text_encoder=self.ranks.master)
        compiled = speed_up([self.models.dit], self.args, fuse_qkv=self.models.relighting is None)
        self.sp, self.guidance = parallel_groups(self.plan)
        self.loras = PoolLoras({"dit": self.models.dit}, self.ranks.device, compiled=compiled,
                               **lora_options(self.args, self.ranks))

    def run(self, job: Job, inputs: dict[str, str], report: Reporter, should_cancel: Callable[[], bool],
            checkpoint: CheckpointStore | None = None, video_out: VideoOutput | None = None) -> dict[str, Any]:
        """One job; with `video_out` (rank 0) each clip's frames are encoded there while the next clip samples."""
        from pipeline.animate import describe_relighting, encode_prompts, generate_animate
        from pipeline.i2v import GenerationCancelled

        src, seed = src_dir(inputs), seed_of(job)
        loras = self.loras.bind(job)  # a LoRA that does not fit fails the job here, before any work
        options, sampling = job.options, job.sampling
        report.progress("encode", 0, 1)
        context, context_null = broadcast_prompts(
            self.ranks, lambda: encode_prompts(self.models, job.prompt, job.negative_prompt))

        def on_progress(phase: str, step: int, total: int, _clip: int) -> None:
            report.progress(PHASE_NAMES.get(phase, phase), step, total)

        fps = output_fps(job, inputs)
        writer = video_out.open(fps) if video_out is not None else None
        try:
            if loras is not None:
                per_clip = sampling.steps * (1 if float(sampling.guide_scale) <= 1 or self.guidance else 2)
                self.loras.apply(loras, {"dit": per_clip}, clip_tokens(job))
            video = generate_animate(
                self.models, src, mode=options.mode, prompt=context, negative_prompt=context_null,
                clip_len=options.clip_len, refert_num=options.refert_num, steps=sampling.steps,
                shift=sampling.shift, guide_scale=float(sampling.guide_scale), solver=sampling.solver,
                timesteps=sampling.timesteps, seed=seed, relighting_lora=options.relighting_lora,
                on_progress=on_progress, should_cancel=should_cancel, sp=self.sp, guidance=self.guidance,
                checkpoint=checkpoint, on_frames=writer.add if writer is not None else None)
        except GenerationCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        finally:  # success, failure or cancel: the DiT is as loaded again before anything else runs
            if loras is not None:
                loras.remove()
        relighting = describe_relighting(options.relighting_lora, self.models.relighting is not None)
        frames, (width, height) = (writer.frames, writer.size) if writer is not None else (
            int(video.shape[1]), (int(video.shape[3]), int(video.shape[2])))
        return {"video": video, "fps": fps, "frames": frames, "width": width, "height": height, "seed": seed,
                "relighting": relighting,
                **run_stats(checkpoint), **(lora_stats(loras) if loras is not None else {})}


def clip_tokens(job: Job) -> int:
    """Tokens of one clip's forward (patches of 16x16 pixels per latent frame, + the reference frame), as the
    LoRA method's cost rule counts them; the first clip's, known before the sources are read."""
    frames = (job.options.clip_len - 1) // 4 + 2
    return frames * job.video.max_area // 256


def src_dir(inputs: dict[str, str]) -> Path:
    """The preprocessed src folder (src_pose.mp4, src_face.mp4, src_ref.png, ...) named by the run inputs."""
    if "pose" not in inputs:
        raise JobInputError(f"inputs: got roles {sorted(inputs)}, expected the preprocessed 'pose', 'face', "
                            f"'ref' (and 'bg', 'mask' for replacement)")
    folder = Path(inputs["pose"]).parent
    if not folder.is_dir():
        raise JobInputError(f"inputs.pose: {inputs['pose']}: its folder does not exist")
    return folder


def output_fps(job: Job, inputs: dict[str, str]) -> float:
    """The job's fps; with none set (preprocess_fps = -1) the rate preprocessing sampled the driving video at."""
    if job.video.fps is not None:
        return float(job.video.fps)
    from pipeline.video import probe

    return float(probe(inputs["pose"])[3])
