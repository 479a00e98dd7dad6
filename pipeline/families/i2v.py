"""The I2V-A14B pool family: both experts resident; each job = encode, sample (parallel), decode (pipelined).

Reads the resolved job's fields as they are; it must not parse parameters or restate their defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from inbox_schema import Job
from pipeline.families.base import (
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
from pipeline.parallel.cfg import ParallelPlan, plan_parallel
from pipeline.parallel.sharding import choose_sharding, shard_experts
from pipeline.parallel.vae_decode import decode_pipelined
from pipeline.sampling.checkpoint import CheckpointStore
from pipeline.video import Mp4Writer, VideoOutput


class I2VFamily:
    """Wan2.2 I2V-A14B: both experts resident; each job = prepare, sample (parallel), decode (pipelined)."""

    kind = "i2v"
    streams_video = True  # run() takes video_out: the worker's mp4 is encoded while the VAE decodes

    def __init__(self, args: argparse.Namespace, ranks: Any) -> None:
        from pipeline.models.dit import DiTConfig

        self.args, self.ranks = args, ranks
        self.root = Path(args.checkpoint_dir)
        config = DiTConfig.from_json(self.root / "high_noise_model" / "config.json")
        self.plan: ParallelPlan = plan_parallel(ranks.world_size, config.num_heads, args.cfg_parallel)
        self.sharding = choose_sharding(args.sharding, self.root, ranks.device, dtype_of(args), ranks.control)
        self.parallel = {**self.plan.as_dict(), "sharding": self.sharding, "text_encoder": "rank0"}
        self.checkpoints: dict[str, str] = {}
        self.models: Any = None
        self.sp: Any = None
        self.guidance: Any = None
        self.loras: Any = None

    def load(self) -> None:
        from pipeline.families.loras import PoolLoras
        from pipeline.i2v import I2VModels

        # fsdp: the experts load into host memory and only this rank's shards go to the GPU;
        # offload (one GPU): the idle expert waits in host memory and is swapped at the boundary.
        in_host = self.sharding in ("fsdp", "offload")
        self.models = I2VModels.load(self.root, self.ranks.device, dtype_of(self.args),
                                     text_encoder=self.ranks.master, offload_experts=in_host)
        if self.sharding == "fsdp":
            shard_experts(self.models, self.ranks.device)
        compiled = speed_up([self.models.high_noise, self.models.low_noise], self.args,
                            fuse_qkv=self.sharding != "fsdp")
        self.sp, self.guidance = parallel_groups(self.plan)
        experts = {"high_noise": self.models.high_noise, "low_noise": self.models.low_noise}
        self.loras = PoolLoras(experts, self.ranks.device, compiled=compiled, sharded=self.sharding == "fsdp",
                               **lora_options(self.args, self.ranks))

    def run(self, job: Job, inputs: dict[str, str], report: Reporter, should_cancel: Callable[[], bool],
            checkpoint: CheckpointStore | None = None, video_out: VideoOutput | None = None) -> dict[str, Any]:
        """One job; with `video_out` (rank 0) its frames are written there while they are decoded."""
        from pipeline.i2v import GenerationCancelled, prepare_i2v, sample_i2v
        from pipeline.sampling import make_solver
        from pipeline.sampling.moe import ExpertSwitch

        image, seed = prepared_image(inputs), seed_of(job)
        loras = self.loras.bind(job)  # a LoRA that does not fit fails the job here, before any work
        sampling, video = job.sampling, job.video
        max_area = video.max_area if self.args.max_area is None else min(video.max_area, self.args.max_area)
        report.progress("encode", 0, 2)  # 1 of 2: the text encoder, 2 of 2: the image's VAE encode
        context, context_null = self._encode_prompts(job)
        report.progress("encode", 1, 2)
        prepared = prepare_i2v(self.models, image, context, context_null, max_area=max_area,
                               frames=video.frames, seed=seed, sp=self.sp)
        switch = ExpertSwitch(boundary=sampling.boundary, guide_scale=sampling.guide_scale)
        solver = make_solver(sampling.solver, sampling.steps, sampling.shift, sampling.timesteps)
        report.progress("encode", 2, 2)
        report.progress("sampling", 0, solver.num_steps)
        try:
            if loras is not None:
                self.loras.apply(loras, expert_forwards(solver, switch, self.guidance), prepared.seq_len)
            latent = sample_i2v(self.models, prepared, solver, switch, guidance=self.guidance, sp=self.sp,
                                on_progress=lambda _phase, step, total: report.progress("sampling", step, total),
                                should_cancel=should_cancel, checkpoint=checkpoint)
        except GenerationCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        finally:  # success, failure or cancel: the experts are as loaded again before anything else runs
            if loras is not None:
                loras.remove()
        writer = video_out.open(float(video.fps)) if video_out is not None else None
        frames = decode_checked(self.models.vae, latent, report, writer, pipelined=self.ranks.world_size > 1)
        return {"video": frames, "fps": float(video.fps), "frames": video.frames,
                "width": prepared.width, "height": prepared.height, "seed": seed,
                **run_stats(checkpoint), **(lora_stats(loras) if loras is not None else {})}

    def _encode_prompts(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        from pipeline.i2v import encode_prompts

        return broadcast_prompts(self.ranks, lambda: encode_prompts(self.models, job.prompt, job.negative_prompt))


def decode_checked(vae: Any, latent: torch.Tensor, report: Reporter, writer: Mp4Writer | None,
                   pipelined: bool = False) -> torch.Tensor | None:
    """Rank 0's pixel frames, checked for NaN/Inf chunk by chunk: streamed into `writer` as the VAE makes them
    (the mp4 encodes while the decode goes on), or returned whole without one; None on other ranks.
    `pipelined`: every rank of the pool runs a slice of the decoder layers (pipeline.parallel.vae_decode)."""
    from pipeline.sampling.numerics import check_finite_frames

    total, chunks, done = int(latent.shape[1]), [], [0]
    report.progress("decode", 0, total)

    def take(frames: torch.Tensor) -> None:  # one latent frame's pixel frames (1, then 4 each), in order
        check_finite_frames(frames)
        (writer.add if writer is not None else chunks.append)(frames)
        done[0] += 1
        report.progress("decode", done[0], total)

    if pipelined:
        decode_pipelined(vae, latent, on_frames=take)
    else:
        for frames in vae.decode_stream(latent):
            take(frames)
    return torch.cat(chunks, dim=1) if chunks else None


def expert_forwards(solver: Any, switch: Any, guidance: Any) -> dict[str, int]:
    """Forwards each expert runs on this rank in one job (guide 1: one per step; else two, or one per CFG half)."""
    from pipeline.sampling.moe import HIGH_NOISE

    counts = {"high_noise": 0, "low_noise": 0}
    for t in solver.timesteps.tolist():
        per_step = 1 if switch.scale(t) == 1.0 or guidance is not None else 2
        counts["high_noise" if switch.expert(t) == HIGH_NOISE else "low_noise"] += per_step
    return counts


def prepared_image(inputs: dict[str, str]) -> str:
    """The prepared image preprocessing left for the job (the run's `inputs.image`)."""
    if "image" not in inputs:
        raise JobInputError(f"inputs: got roles {sorted(inputs)}, expected 'image' for an i2v job")
    if not Path(inputs["image"]).is_file():
        raise JobInputError(f"inputs.image: {inputs['image']} does not exist (expected the prepared image)")
    return inputs["image"]
