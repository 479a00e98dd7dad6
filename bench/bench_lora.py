"""Benchmark: switching LoRAs on a warm pool at 14B size — merge and exact restore into both I2V experts, and
the per-forward cost of unmerged hooks against merged weights; checks that restores are bitwise.

Random bf16 experts at the real I2V-A14B shape on one GPU (bench_dit_forward.build; no checkpoint), each with
a Lightning-like LoRA written as a real file (original/ComfyUI layout, bf16): rank --rank on every block Linear
(self/cross q, k, v, o, ffn.0, ffn.2: 400 per expert) plus `.diff_b` on their biases and `.diff` on norm3,
the q/k norms and the modulation tables. Forwards are timed on one expert with the pool's fused q/k/v (not
compiled: unmerged hooks run eagerly anyway; the eager/compiled gap is in bench/RESULTS.md). Prints one JSON
line, including the `costs` constants for pipeline.lora.method.SwitchCosts. About 3-4 minutes on one H200 with
the defaults. Must not load or download real weights.

    python bench/bench_lora.py                         # 480p and 720p, 2 timed forwards per method
    python bench/bench_lora.py --size 480p --steps 1   # quicker
    python bench/bench_lora.py --pristine cuda         # pristine copies on the GPU instead of pinned host memory
    python bench/bench_lora.py --tiny                  # CPU smoke test (tiny config)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, make_inputs, run_once, tiny_config  # noqa: E402
from pipeline.lora import PristineWeights, bind_lora, hook_loras, merge_loras, read_lora  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from pipeline.models.fast import optimize  # noqa: E402

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
FULL_DIFFS = ("norm3.weight", "norm3.bias", "self_attn.norm_q.weight", "self_attn.norm_k.weight",
              "cross_attn.norm_q.weight", "cross_attn.norm_k.weight", "modulation")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="480p,720p", help="comma list of 480p, 720p (token counts of 81 frames)")
    p.add_argument("--steps", type=int, default=2, help="timed forwards per method and size")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--pristine", choices=("pinned", "cpu", "cuda"), default="pinned",
                   help="where the exact copies of the touched weights live")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def lightning_like(model: nn.Module, rank: int, seed: int, device: torch.device, linears: tuple[str, ...] = LINEARS,
                   full_diffs: tuple[str, ...] = FULL_DIFFS) -> dict[str, torch.Tensor]:  # fmt: skip
    """Original-layout keys: pairs on every block Linear of `linears` (+ alpha, + diff_b), full diffs on
    `full_diffs` (norms, modulation). Only the model's shapes are read: it may be on the meta device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for i in range(len(model.blocks)):
        for name in linears:
            w = params[f"blocks.{i}.{name}.weight"]
            key = f"diffusion_model.blocks.{i}.{name}"
            down = torch.randn(rank, w.shape[1], generator=gen, device=device) / math.sqrt(w.shape[1])
            up = torch.randn(w.shape[0], rank, generator=gen, device=device) * (0.02 / math.sqrt(rank))
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(float(rank))
            state[f"{key}.diff_b"] = torch.randn(w.shape[0], generator=gen, device=device) * 1e-3
        for name in full_diffs:
            target = params[f"blocks.{i}.{name}"]
            module, leaf = f"diffusion_model.blocks.{i}.{name}".rsplit(".", 1)
            key = {"bias": f"{module}.diff_b", "weight": f"{module}.diff"}.get(leaf, f"{module}.{leaf}.diff")
            state[key] = torch.randn(target.shape, generator=gen, device=device) * 1e-3
    return {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in state.items()}


def fingerprint(model: nn.Module) -> list[int]:
    """An exact-ish checksum per parameter: its bit patterns weighted by position (restores must match it)."""
    sums = []
    with torch.no_grad():
        for p in model.parameters():
            bits = p.detach().reshape(-1).view(torch.int16 if p.element_size() == 2 else torch.int32).to(torch.int64)
            weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
            sums.append(int((bits * weights).sum()))
    return sums


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def store_for(kind: str) -> PristineWeights:
    return {"pinned": lambda: PristineWeights("cpu", pin_memory=True), "cpu": lambda: PristineWeights("cpu"),
            "cuda": lambda: PristineWeights("cuda")}[kind]()  # fmt: skip


def time_forwards(model: nn.Module, bound: list, store: PristineWeights, config: DiTConfig, size: str,
                  device: torch.device, args: argparse.Namespace, clock: Clock) -> dict:  # fmt: skip
    """Best of --steps forwards: plain, merged, hooked; and whether the output after each is bitwise plain's."""
    inputs = make_inputs(config, LATENTS[size], device, args.seed)
    plain_out = run_once(model, inputs, device)  # warm-up, and the reference output

    def best() -> float:
        return min(clock.time(lambda: run_once(model, inputs, device))[0] for _ in range(args.steps))

    row: dict = {"tokens": inputs["seq_len"], "plain_s": best()}
    with merge_loras(model, bound, store):
        row["merged_s"] = best()
    row["bitwise_output_after_restore"] = bool(torch.equal(run_once(model, inputs, device), plain_out))
    row["hook_install_s"], hooks = clock.time(lambda: hook_loras(model, bound))
    try:
        row["hooked_s"] = best()
    finally:
        row["hook_remove_s"], _ = clock.time(hooks.remove)
    row["bitwise_output_after_hooks"] = bool(torch.equal(run_once(model, inputs, device), plain_out))
    row["hook_overhead_s"] = row["hooked_s"] - row["merged_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, config, sizes = torch.device("cpu"), torch.float32, tiny_config("i2v"), ["tiny"]
        args.pristine = "cpu"  # no page-locked memory or GPU without CUDA
    else:
        if not torch.cuda.is_available():
            print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), torch.bfloat16, DiTConfig.real_14b()
        sizes = [s.strip() for s in args.size.split(",")]
    clock, result = Clock(device), {"bench": "lora", "rank": args.rank, "pristine": args.pristine}
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    experts = {name: optimize(build(config, device, dtype, args.seed + i), compile=False, fuse_qkv=True)
               for i, name in enumerate(("high_noise", "low_noise"))}  # fmt: skip
    prints = {name: fingerprint(m) for name, m in experts.items()}

    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for i, (name, model) in enumerate(experts.items()):
            path = Path(folder) / f"lightning_like_{name}.safetensors"
            save_file(lightning_like(model, args.rank, args.seed + 10 + i, device), str(path))
            files[name] = path
        read_s, lora_files = clock.time(lambda: {n: read_lora(p) for n, p in files.items()})
        result["lora_file_mb"] = round(files["high_noise"].stat().st_size / 2**20, 1)
    bind_s, bound = clock.time(lambda: {n: [bind_lora(lora_files[n], experts[n], 1.0)] for n in experts})
    touched = sum(sum(b[0].touched.values()) for b in bound.values())
    result |= {"read_s": round(read_s, 2), "bind_s": round(bind_s, 2), "touched_gib": round(touched / 2**30, 2),
               "weights_touched_per_expert": len(bound["high_noise"][0].touched)}  # fmt: skip

    stores = {n: store_for(args.pristine) for n in experts}
    merge = lambda: [merge_loras(experts[n], bound[n], stores[n]) for n in experts]  # noqa: E731
    result["first_merge_s"], merged = clock.time(merge)  # includes taking the pristine copies
    result["restore_s"], _ = clock.time(lambda: [m.restore() for m in merged])
    result["switch_merge_s"], merged = clock.time(merge)  # copies kept: what a later job pays
    result["switch_restore_s"], _ = clock.time(lambda: [m.restore() for m in merged])
    result["pristine_gib"] = round(sum(s.nbytes for s in stores.values()) / 2**30, 2)
    result["bitwise_weights_after_merges"] = all(fingerprint(m) == prints[n] for n, m in experts.items())

    high = experts["high_noise"]
    result["forward"] = {size: time_forwards(high, bound["high_noise"], stores["high_noise"], config, size, device,
                                             args, clock) for size in sizes}  # fmt: skip
    result["bitwise_weights_at_end"] = all(fingerprint(m) == prints[n] for n, m in experts.items())

    layers = len(bound["high_noise"][0].low_rank)
    rates = [r["hook_overhead_s"] / (layers * r["tokens"] / 1000) for r in result["forward"].values()]
    result["costs"] = {  # pipeline.lora.method.SwitchCosts, from this run
        "merge_restore_s_per_gib": round((result["switch_merge_s"] + result["switch_restore_s"]) / (touched / 2**30), 4),
        "hook_s_per_layer_ktoken": float(f"{max(sum(rates) / len(rates), 0.0):.3g}"),
    }  # fmt: skip
    for key in ("first_merge_s", "restore_s", "switch_merge_s", "switch_restore_s"):
        result[key] = round(result[key], 3)
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)
    ok = result["bitwise_weights_after_merges"] and result["bitwise_weights_at_end"] and all(
        r["bitwise_output_after_restore"] and r["bitwise_output_after_hooks"] for r in result["forward"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
