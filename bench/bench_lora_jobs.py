"""Benchmark: LoRA jobs on a warm pool at 14B size — the pool's own per-job path (pipeline.families.loras.PoolLoras:
read + bind, apply, remove) between jobs, and the 4-step lightning-4step preset's sampling, with bitwise checks.

Random bf16 I2V-A14B experts on one GPU (bench_dit_forward.build; no checkpoint), each with a Lightning-like LoRA
written as a real file into a throwaway LoRA library (bench_lora.lightning_like, plus the k_img/v_img/norm_k_img keys
lightx2v's Wan2.2 LoRAs carry, which the pool drops). The job is a real manifest (`preset = "lightning-4step"`, one
[[lora]] per expert) parsed by inbox_schema. Sequence: a plain 4-step job on the fresh pool (twice: the first warms
up / compiles), LoRA job A (first read of the files), a plain job, LoRA job B (reads cached by the sha256 intake records, pristine
copies kept), a plain job; both plain jobs after a LoRA job must give the fresh pool's latent bitwise. Reports
`switch_s` = A's removal + B's bind + B's apply (the issue's target: <= 2 s) and the DiT sampling seconds of the
4-step job (T5, VAE encode and decode come on top: bench/bench_vae.py, bench/RESULTS.md). Prints one JSON line.
Must not load or download real weights.

    python bench/bench_lora_jobs.py                       # 720p, 81 frames, pool's cost rule, compiled blocks
    python bench/bench_lora_jobs.py --size 480p
    python bench/bench_lora_jobs.py --method unmerged     # force the hooks (the rule's other choice)
    python bench/bench_lora_jobs.py --no-compile          # eager blocks
    python bench/bench_lora_jobs.py --tiny                # CPU smoke test (tiny config)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, tiny_config  # noqa: E402
from bench.bench_lora import Clock, fingerprint, lightning_like  # noqa: E402
from inbox_schema import parse_manifest_text  # noqa: E402
from inbox_schema.checks import file_sha256  # noqa: E402
from pipeline.families.i2v import expert_forwards  # noqa: E402
from pipeline.families.loras import PoolLoras  # noqa: E402
from pipeline.i2v import I2VInputs, I2VModels, sample_i2v  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from pipeline.models.fast import optimize  # noqa: E402
from pipeline.sampling import make_solver  # noqa: E402
from pipeline.sampling.moe import ExpertSwitch  # noqa: E402

MANIFEST = """schema = 1
kind = "i2v"
prompt = "bench"
[inputs]
image = "bench.jpg"
[sampling]
preset = "lightning-4step"
seed = 1
[[lora]]
library = "lightning/high_noise_model.safetensors"
expert = "high_noise"
[[lora]]
library = "lightning/low_noise_model.safetensors"
expert = "low_noise"
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("480p", "720p"), default="720p", help="81-frame latent shape")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--method", choices=("auto", "merged", "unmerged"), default="auto",
                   help="the pool's --lora-method (auto: pipeline.lora.choose_method)")
    p.add_argument("--no-compile", action="store_true", help="eager DiT blocks (the pool compiles them on CUDA)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_library(folder: Path, experts: dict, rank: int, seed: int, device: torch.device) -> None:
    """One Lightning-like file per expert, with the image-attention keys of lightx2v's Wan2.2 I2V LoRAs."""
    (folder / "lightning").mkdir(parents=True)
    for i, (name, model) in enumerate(experts.items()):
        state = lightning_like(model, rank, seed + 10 + i, device)
        dim = model.config.dim
        for block in range(len(model.blocks)):
            for module in ("k_img", "v_img"):
                key = f"diffusion_model.blocks.{block}.cross_attn.{module}"
                state[f"{key}.lora_down.weight"] = torch.zeros(rank, dim, dtype=torch.bfloat16)
                state[f"{key}.lora_up.weight"] = torch.zeros(dim, rank, dtype=torch.bfloat16)
            state[f"diffusion_model.blocks.{block}.cross_attn.norm_k_img.diff"] = torch.zeros(dim, dtype=torch.bfloat16)
        save_file(state, str(folder / "lightning" / f"{name}_model.safetensors"))


def accepted(job):
    """The job as the daemon hands it to the pool: intake hashes each library LoRA at acceptance (on the CPU, off
    the pool's time) and records the sha256 in the job, which is what lets the pool take a file it has read before
    from its cache instead of reading and hashing it again."""
    for i, lora in enumerate(job.loras):
        job = job.with_lora_sha256(i, file_sha256(lora.path))
    return job


def sampler(models: I2VModels, config: DiTConfig, grid: tuple[int, int, int], job, device: torch.device, seed: int):
    """A function running the job's 4-step sampling on fixed random inputs; returns the final latent."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    t, h, w = grid
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    inputs = I2VInputs(y=rand(config.in_dim - 16, t, h, w), noise=rand(16, t, h, w),
                       context=rand(config.text_len, config.text_dim), context_null=rand(config.text_len, config.text_dim),
                       seq_len=t * h * w // 4, width=w * 8, height=h * 8, frames=4 * (t - 1) + 1)
    s = job.sampling

    def run() -> torch.Tensor:
        solver = make_solver(s.solver, s.steps, s.shift, s.timesteps)
        return sample_i2v(models, inputs, solver, ExpertSwitch(boundary=s.boundary, guide_scale=s.guide_scale))

    return run, inputs.seq_len


def lora_job(pool: PoolLoras, job, sample, tokens: int, clock: Clock) -> tuple[dict, torch.Tensor]:
    """One LoRA job as the I2V family runs it: bind, apply (forwards per expert as the family counts them), sample,
    remove; its timings and the final latent."""
    s = job.sampling
    forwards = expert_forwards(make_solver(s.solver, s.steps, s.shift, s.timesteps),
                               ExpertSwitch(boundary=s.boundary, guide_scale=s.guide_scale), None)
    row: dict = {"forwards": forwards}
    row["bind_s"], run = clock.time(lambda: pool.bind(job))
    row["apply_s"], _ = clock.time(lambda: pool.apply(run, forwards, tokens))
    try:
        row["sample_s"], latent = clock.time(sample)
    finally:
        row["remove_s"], _ = clock.time(run.remove)
    row["methods"] = {n: m.value for n, m in run.applied.methods.items()}
    row["ignored_keys"] = run.describe()[0].get("ignored_keys", {}).get("count")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, latent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, config, grid = torch.device("cpu"), torch.float32, tiny_config("i2v"), LATENTS["tiny"]
        compiled = False
    else:
        if not torch.cuda.is_available():
            print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
            return 2
        device, dtype, config, grid = torch.device("cuda"), torch.bfloat16, DiTConfig.real_14b(), LATENTS[args.size]
        compiled = not args.no_compile
    clock = Clock(device)
    result: dict = {"bench": "lora_jobs", "size": "tiny" if args.tiny else args.size, "rank": args.rank,
                    "method": args.method, "compiled": compiled,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    experts = {name: optimize(build(config, device, dtype, args.seed + i), compile=compiled, fuse_qkv=True)
               for i, name in enumerate(("high_noise", "low_noise"))}  # fmt: skip
    prints = {name: fingerprint(m) for name, m in experts.items()}
    models = I2VModels(experts["high_noise"], experts["low_noise"], vae=None, text_encoder=None, device=device,
                       dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        library = Path(folder) / "loras"
        write_library(library, experts, args.rank, args.seed, device)
        job = accepted(parse_manifest_text(MANIFEST, "bench.toml", Path(folder), check_inputs=False,
                                           lora_library=library))
        plain_job = parse_manifest_text(MANIFEST.split("[[lora]]")[0], "bench.toml", Path(folder), check_inputs=False)
        sample, tokens = sampler(models, config, grid, plain_job, device, args.seed)
        pool = PoolLoras(experts, device, compiled=compiled, method=args.method)
        result["tokens"] = tokens
        result["plain_warmup_s"], _ = clock.time(sample)  # compiles the blocks for this shape when compiled
        result["plain_s"], fresh = clock.time(sample)
        result["job_a"], lora_a = lora_job(pool, job, sample, tokens, clock)
        after_a = sample()
        result["job_b"], lora_b = lora_job(pool, job, sample, tokens, clock)
        after_b = sample()
    result["switch_s"] = round(result["job_a"]["remove_s"] + result["job_b"]["bind_s"] + result["job_b"]["apply_s"], 3)
    result["lora_changes_latent"] = not torch.equal(lora_a, fresh)
    result["same_lora_same_latent"] = bool(torch.equal(lora_a, lora_b))
    result["bitwise_after_lora_jobs"] = bool(torch.equal(after_a, fresh) and torch.equal(after_b, fresh))
    result["bitwise_weights_at_end"] = all(fingerprint(m) == prints[n] for n, m in experts.items())
    result["pristine_bytes"] = sum(s.nbytes for s in pool.pristine.values())  # host copies kept for merges
    result["pristine_gib"] = round(result["pristine_bytes"] / 2**30, 2)
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for key in ("plain_warmup_s", "plain_s"):
        result[key] = round(result[key], 3)
    print(json.dumps(result), flush=True)
    ok = result["bitwise_after_lora_jobs"] and result["bitwise_weights_at_end"] and result["lora_changes_latent"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
