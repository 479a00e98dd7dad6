"""A model family as the warm pool runs it: load once across the ranks, then turn `run` commands into videos.

Decides placement (Ulysses / CFG-parallel groups, replication or FSDP, T5 on rank 0) and nothing else: the
math is the pipelines' (pipeline/i2v.py), the socket and the mp4 are the worker's.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pipeline.parallel.cfg import CfgParallel, ParallelPlan, plan_parallel
from pipeline.parallel.sharding import choose_sharding, shard_experts
from pipeline.parallel.ulysses import UlyssesParallel
from pipeline.parallel.vae_decode import decode_pipelined

# the pipelines' progress phases -> the protocol's
PHASE_NAMES = {"encoding": "encode", "sampling": "sampling", "decoding": "decode"}


class Reporter(Protocol):
    def progress(self, phase: str, step: int = 0, total: int = 0) -> None: ...


class JobCancelled(Exception):
    """The supervisor cancelled the running job; raised at a step boundary on every rank at once."""


class PoolShutdown(JobCancelled):
    """The supervisor asked the pool to stop (or went away) while a job was running."""


class JobFailure(Exception):
    """A job failure whose kind and retryability are known (the worker reports them as they are)."""

    kind = "internal"
    retryable = True


class JobInputError(JobFailure, ValueError):
    """A `run` command whose params or inputs the pipeline cannot use; names the field and the value."""

    kind = "input"
    retryable = False


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def speed_up(experts: list[torch.nn.Module], args: argparse.Namespace, fuse_qkv: bool) -> None:
    """The fast path of pipeline.models.fast on loaded DiTs: fused q/k/v and regional compile (same function).

    fuse_qkv is off where the q/k/v layers must stay separate (FSDP shards them; a resident LoRA hooks them);
    compile stays off on the CPU (tests, the demo), where compiling would cost more than it saves.
    """
    from pipeline.models.fast import optimize

    mode = getattr(args, "compile", "auto")
    compile_blocks = mode == "on" or (mode == "auto" and args.device == "cuda")
    for expert in experts:
        optimize(expert, compile=compile_blocks, fuse_qkv=fuse_qkv)


def param(params: dict[str, Any], path: str) -> Any:
    """params["video"]["frames"] as param(params, "video.frames"), with an error that names the field."""
    value: Any = params
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise JobInputError(f"params.{path}: missing from the run command (the resolved manifest job)")
        value = value[key]
    return value


class I2VFamily:
    """Wan2.2 I2V-A14B: both experts resident; each job = prepare, sample (parallel), decode (pipelined)."""

    kind = "i2v"

    def __init__(self, args: argparse.Namespace, ranks: Any) -> None:
        from pipeline.models.dit import DiTConfig

        self.args, self.ranks = args, ranks
        self.root = Path(args.checkpoint_dir)
        config = DiTConfig.from_json(self.root / "high_noise_model" / "config.json")
        self.plan: ParallelPlan = plan_parallel(ranks.world_size, config.num_heads, args.cfg_parallel)
        self.sharding = choose_sharding(args.sharding, self.root, ranks.device, dtype_of(args), ranks.control)
        self.parallel = {**self.plan.as_dict(), "sharding": self.sharding, "text_encoder": "rank0"}
        self.models: Any = None
        self.sp: Any = None
        self.guidance: Any = None

    def load(self) -> None:
        from pipeline.i2v import I2VModels

        # fsdp: the experts load into host memory and only this rank's shards go to the GPU;
        # offload (one GPU): the idle expert waits in host memory and is swapped at the boundary.
        in_host = self.sharding in ("fsdp", "offload")
        self.models = I2VModels.load(self.root, self.ranks.device, dtype_of(self.args),
                                     text_encoder=self.ranks.master, offload_experts=in_host)
        if self.sharding == "fsdp":
            shard_experts(self.models, self.ranks.device)
        speed_up([self.models.high_noise, self.models.low_noise], self.args, fuse_qkv=self.sharding != "fsdp")
        self.sp, self.guidance = parallel_groups(self.plan)

    def run(self, command: dict[str, Any], report: Reporter, should_cancel: Callable[[], bool]) -> dict[str, Any]:
        from pipeline.i2v import GenerationCancelled, decode_video, prepare_i2v, sample_i2v
        from pipeline.parallel.resume import checkpoint_store, run_stats
        from pipeline.sampling import make_solver
        from pipeline.sampling.moe import ExpertSwitch
        from pipeline.sampling.numerics import check_finite_frames

        job = I2VJob(command, self.args.max_area)
        store = checkpoint_store(command, self)  # resume: None unless the run command asks for it
        report.progress("encode", 0, 1)
        context, context_null = self._encode_prompts(job)
        inputs = prepare_i2v(self.models, job.image, context, context_null, max_area=job.max_area,
                             frames=job.frames, seed=job.seed, sp=self.sp)
        switch = ExpertSwitch(boundary=job.boundary, guide_scale=job.guide_scale)
        solver = make_solver(job.solver, job.steps, job.shift, job.timesteps)
        report.progress("encode", 1, 1)
        report.progress("sampling", 0, solver.num_steps)
        try:
            latent = sample_i2v(self.models, inputs, solver, switch, guidance=self.guidance, sp=self.sp,
                                on_progress=lambda _phase, step, total: report.progress("sampling", step, total),
                                should_cancel=should_cancel, checkpoint=store)
        except GenerationCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        report.progress("decode", 0, 1)
        if self.ranks.world_size > 1:  # every rank runs a slice of the decoder layers; rank 0 gets the video
            video = decode_pipelined(self.models.vae, latent)
            check_finite_frames(video)  # rank 0's frames (decode_video checks its own)
        else:
            video = decode_video(self.models, latent)
        report.progress("decode", 1, 1)
        return {"video": video, "fps": job.fps, "frames": job.frames,
                "width": inputs.width, "height": inputs.height, "seed": job.seed, **run_stats(store)}

    def _encode_prompts(self, job: I2VJob) -> tuple[torch.Tensor, torch.Tensor]:
        from pipeline.i2v import encode_prompts

        return broadcast_prompts(self.ranks, lambda: encode_prompts(self.models, job.prompt, job.negative_prompt))


class I2VJob:
    """The fields of a resolved i2v job (inbox_schema Job.to_dict()) that generation needs."""

    def __init__(self, command: dict[str, Any], max_area_cap: int | None) -> None:
        params = command["params"]
        if "image" not in command["inputs"]:
            raise JobInputError(f"inputs: got roles {sorted(command['inputs'])}, expected 'image' for an i2v job")
        self.image = command["inputs"]["image"]
        if not Path(self.image).is_file():
            raise JobInputError(f"inputs.image: {self.image} does not exist (expected the prepared image)")
        self.prompt = str(param(params, "prompt"))
        self.negative_prompt = params.get("negative_prompt") or None
        self.max_area = int(param(params, "video.max_area"))
        if max_area_cap is not None:
            self.max_area = min(self.max_area, max_area_cap)
        self.frames = int(param(params, "video.frames"))
        self.fps = float(param(params, "video.fps"))
        sampling = param(params, "sampling")
        self.steps, self.shift = int(param(params, "sampling.steps")), float(param(params, "sampling.shift"))
        guide = param(params, "sampling.guide_scale")
        self.guide_scale = tuple(guide) if isinstance(guide, list) else guide
        self.solver = str(param(params, "sampling.solver"))
        self.seed = param(params, "sampling.seed")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise JobInputError(f"params.sampling.seed: got {self.seed!r}, expected an integer fixed at acceptance")
        self.boundary = float(sampling.get("boundary") or 0.9)
        self.timesteps = sampling.get("timesteps")


class AnimateFamily:
    """Animate-14B: one DiT resident (plus CLIP, VAE; T5 on rank 0); each job = clips sampled in parallel.

    Every rank decodes each clip, because the next clip is conditioned on the last frames of this one.
    """

    kind = "animate"

    def __init__(self, args: argparse.Namespace, ranks: Any) -> None:
        import json

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
        self.models: Any = None
        self.sp: Any = None
        self.guidance: Any = None

    def load(self) -> None:
        from pipeline.animate import LORA_FILE, AnimateModels

        self.models = AnimateModels.load(self.root, self.ranks.device, dtype_of(self.args),
                                         relighting_lora=(self.root / LORA_FILE).is_file(),
                                         text_encoder=self.ranks.master)
        speed_up([self.models.dit], self.args, fuse_qkv=self.models.relighting is None)
        self.sp, self.guidance = parallel_groups(self.plan)

    def run(self, command: dict[str, Any], report: Reporter, should_cancel: Callable[[], bool]) -> dict[str, Any]:
        from pipeline.animate import encode_prompts, generate_animate
        from pipeline.i2v import GenerationCancelled
        from pipeline.parallel.resume import checkpoint_store, run_stats

        params = command["params"]
        store = checkpoint_store(command, self)  # resume: None unless the run command asks for it
        src = _animate_src_dir(command["inputs"])
        options = params.get("animate") or {}
        sampling = param(params, "sampling")
        seed = param(params, "sampling.seed")
        report.progress("encode", 0, 1)
        context, context_null = broadcast_prompts(
            self.ranks, lambda: encode_prompts(self.models, params.get("prompt") or None,
                                               params.get("negative_prompt") or None))

        def on_progress(phase: str, step: int, total: int, _clip: int) -> None:
            report.progress(PHASE_NAMES.get(phase, phase), step, total)

        try:
            video = generate_animate(
                self.models, src, mode=str(options.get("mode", "animation")), prompt=context,
                negative_prompt=context_null, clip_len=int(options.get("clip_len", 77)),
                refert_num=int(options.get("refert_num", 1)), steps=int(sampling["steps"]),
                shift=float(sampling["shift"]), guide_scale=float(sampling["guide_scale"]),
                solver=str(sampling["solver"]), seed=seed, relighting_lora=bool(options.get("relighting_lora")),
                on_progress=on_progress, should_cancel=should_cancel, sp=self.sp, guidance=self.guidance,
                checkpoint=store)
        except GenerationCancelled as exc:
            raise JobCancelled(str(exc)) from exc
        fps = float(param(params, "video.fps"))
        return {"video": video, "fps": fps, "frames": int(video.shape[1]), "width": int(video.shape[3]),
                "height": int(video.shape[2]), "seed": seed, **run_stats(store)}


def _animate_src_dir(inputs: dict[str, str]) -> Path:
    """The preprocessed src folder (src_pose.mp4, src_face.mp4, src_ref.png, ...) named by the run inputs."""
    if "pose" not in inputs:
        raise JobInputError(f"inputs: got roles {sorted(inputs)}, expected the preprocessed 'pose', 'face', "
                            f"'ref' (and 'bg', 'mask' for replacement)")
    folder = Path(inputs["pose"]).parent
    if not folder.is_dir():
        raise JobInputError(f"inputs.pose: {inputs['pose']}: its folder does not exist")
    return folder


def broadcast_prompts(ranks: Any, encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 runs on rank 0 only (its ~11 GB stay off the other GPUs); the embeddings go to every rank."""
    pair: list[Any] = [None]
    if ranks.master:
        context, context_null = encode()
        pair = [(context.cpu(), context_null.cpu())]
    dist.broadcast_object_list(pair, src=0, group=ranks.control)
    context, context_null = pair[0]
    return context.to(ranks.device), context_null.to(ranks.device)


HASHED_MAX_BYTES = 64 * 2**20  # configs, indexes, tokenizers: hashed; multi-GB weight shards: size + mtime


def fingerprint(root: Path) -> dict[str, str]:
    """What the pool loaded, per file under the checkpoint dir: sha256 of small files, size and mtime of big ones.

    Cheap enough to compute at every pool start; `wanbox models verify --deep` hashes the shards themselves.
    """
    files: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        if info.st_size <= HASHED_MAX_BYTES:
            files[str(path.relative_to(root))] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            files[str(path.relative_to(root))] = f"size:{info.st_size} mtime:{int(info.st_mtime)}"
    return files


def parallel_groups(plan: ParallelPlan) -> tuple[Any, Any]:
    """(sp, guidance) for a plan: CFG halves with Ulysses inside, plain Ulysses, or nothing on one rank."""
    if plan.cfg == 2:
        cfg = CfgParallel()
        return cfg.sp, cfg
    if plan.ulysses > 1:
        return UlyssesParallel(), None
    return None, None


def open_family(args: argparse.Namespace, ranks: Any) -> I2VFamily | AnimateFamily:
    """The family for `--model`, planned (groups, sharding) but not loaded yet."""
    return I2VFamily(args, ranks) if args.model == "i2v-A14B" else AnimateFamily(args, ranks)
