"""Benchmark: loading I2V experts in the released layout (fp32 safetensors in 6 shards + index + config.json) from
the page cache to the GPU in bf16, staged reader vs safetensors' own copies; seconds, GB/s, RAM and disk needed.

Must not download anything nor leave its files behind: it writes random weights into a temporary folder (removed
at the end unless --keep) and refuses to start when the disk is too small, saying how much it needs.

    python bench/bench_load.py                       # one expert at real size (57.2 GB of shards), both read paths
    python bench/bench_load.py --experts 2           # both experts (needs ~115 GB of disk and of page cache)
    python bench/bench_load.py --scale 1e-4 --device cpu   # CPU smoke test (same layout, tiny widths)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.models.dit import DiTConfig, WanDiT  # noqa: E402
from pipeline.weights import loader  # noqa: E402

SHARDS = 6  # as released (the loader follows the index, never this number)
EXPERTS = ("high_noise_model", "low_noise_model")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
OTHER_I2V_FILES_GB = 11.4 + 0.5  # T5 encoder (bf16 .pth) + VAE, read once per pool start
POOL_FLOATS = 16 << 20  # 64 MiB of random fp32 values, repeated to fill every tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, choices=(1, 2), default=1)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real parameter count (smoke tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    p.add_argument("--paths", default="staged,safetensors,staged", help="read paths to time, in order (CUDA only)")
    return p.parse_args(argv)


def scaled_config(scale: float) -> DiTConfig:
    """The 14B expert's config, widths shrunk by sqrt(scale) (40 layers and 40 heads kept: same tensor count)."""
    real = DiTConfig.real_14b()
    if scale >= 1:
        return real
    f = math.sqrt(scale)
    step = 2 * real.num_heads  # dim must split into 40 heads of even size
    return dataclasses.replace(
        real, dim=max(step, round(real.dim * f / step) * step), ffn_dim=max(16, round(real.ffn_dim * f)),
        text_dim=max(16, round(real.text_dim * f)), freq_dim=max(16, round(real.freq_dim * f)),
    )  # fmt: skip


def tensor_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanDiT(config).state_dict().items()}


def write_expert(folder: Path, config: DiTConfig, shapes: dict[str, tuple[int, ...]], pool: bytes) -> int:
    """config.json, SHARDS fp32 safetensors shards split by size, and the index; returns bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **raw}))
    sizes = {k: 4 * math.prod(s) for k, s in shapes.items()}
    target, shards, current, filled = sum(sizes.values()) / SHARDS, [], [], 0
    for key in shapes:
        if current and filled + sizes[key] > target and len(shards) < SHARDS - 1:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += sizes[key]
    shards.append(current)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(folder / name, {k: shapes[k] for k in keys}, pool)
        weight_map |= {k: name for k in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return total


def write_shard(file: Path, shapes: dict[str, tuple[int, ...]], pool: bytes) -> int:
    """A safetensors file written as the format defines it (u64 header length, JSON header, raw data)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for shape in shapes.values():
            left = 4 * math.prod(shape)
            while left:
                part = min(left, len(pool))
                f.write(pool[:part])
                left -= part
    return 8 + len(text) + offset


def read_all(files: list[Path]) -> float:
    """Read every byte once (fills the page cache); returns seconds."""

    def read(file: Path) -> None:
        with open(file, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, files))
    return time.perf_counter() - start


def filesystem(path: Path) -> str:
    """Type of the filesystem holding `path` (tmpfs means the 'disk' is RAM: say so next to the numbers)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def timed_load(root: Path, experts: int, device: torch.device, staged: bool) -> tuple[float, dict[str, float]]:
    """Seconds to load the experts to `device` in bf16 (until the GPU is done), and checksums of a few tensors."""
    loader.STAGED_READS = staged
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if experts == 2:
        models = list(loader.load_i2v_experts(root, torch.bfloat16, device))
    else:
        models = [loader.load_dit(root / EXPERTS[0], torch.bfloat16, device)]
    sync()
    seconds = time.perf_counter() - start
    state = models[0].state_dict()
    sums = {k: float(state[k].double().sum()) for k in list(state)[:: max(1, len(state) // 12)]}
    del models, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, sums


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu with a small --scale)", file=sys.stderr)
        return 2
    config = scaled_config(args.scale)
    shapes = tensor_shapes(config)
    expert_bytes = sum(4 * math.prod(s) for s in shapes.values())
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = args.experts * expert_bytes * 1.01
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"error: {parent} has {free / 1e9:.1f} GB free; {args.experts} expert(s) at scale {args.scale} need "
              f"{need / 1e9:.1f} GB (use --experts 1, a smaller --scale, or --dir on a larger disk)", file=sys.stderr)  # fmt: skip
        return 2
    root = Path(tempfile.mkdtemp(prefix="wanbox-load-", dir=parent))
    try:
        return run(args, device, config, shapes, expert_bytes, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, config: DiTConfig, shapes: dict, expert_bytes: int,
        root: Path) -> int:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(min(POOL_FLOATS, max(1, expert_bytes // 4)), generator=gen) * 0.02).numpy().tobytes()
    start = time.perf_counter()
    written = sum(write_expert(root / name, config, shapes, pool) for name in EXPERTS[: args.experts])
    os.sync()
    write_s = time.perf_counter() - start
    files = sorted(root.rglob("*.safetensors"))
    warm_s = read_all(files)
    report = {"bench": "load", "experts": args.experts, "scale": args.scale, "params_per_expert": expert_bytes // 4,
              "bytes_on_disk": written, "write_s": round(write_s, 1), "first_read_s": round(warm_s, 2),
              "first_read_gb_s": round(written / warm_s / 1e9, 2), "device": str(device),
              "filesystem": filesystem(root)}  # fmt: skip
    print(json.dumps(report), flush=True)
    paths = [p.strip() for p in args.paths.split(",")] if device.type == "cuda" else ["cpu"]
    sums: dict[str, dict[str, float]] = {}
    for path in paths:
        seconds, sums[path] = timed_load(root, args.experts, device, staged=path == "staged")
        row = {"bench": "load", "path": path, "experts": args.experts, "seconds": round(seconds, 2),
               "gb_s": round(written / seconds / 1e9, 2), "same_tensors_as_first": sums[path] == sums[paths[0]]}  # fmt: skip
        print(json.dumps(row), flush=True)
        report.setdefault("loads", []).append(row)
    print_summary(report, expert_bytes, args.experts)
    return 0 if all(r["same_tensors_as_first"] for r in report["loads"]) else 1


def print_summary(report: dict, expert_bytes: int, experts: int) -> None:
    """Best time per path, extrapolated to both experts when one was measured, and what `doctor` should say."""
    best: dict[str, float] = {}
    for row in report["loads"]:
        best[row["path"]] = min(best.get(row["path"], math.inf), row["seconds"])
    print(f"\n{'path':<14}{'experts':>8}{'best s':>9}{'GB/s':>8}{'2 experts s':>13}")
    for path, seconds in best.items():
        both = seconds * (2 / experts)
        note = " (extrapolated x2)" if experts == 1 else ""
        print(f"{path:<14}{experts:>8}{seconds:>9.2f}{report['bytes_on_disk'] / seconds / 1e9:>8.2f}{both:>13.1f}{note}")
    dit_gb = 2 * expert_bytes / 1e9
    print(f"\nlayout needs: disk {dit_gb:.1f} GB of DiT shards (+{OTHER_I2V_FILES_GB} GB T5/VAE) for I2V-A14B; "
          f"RAM for page-cache-speed loads: {dit_gb:.1f} GB free for the page cache (+0.5 GB pinned staging); "
          f"GPU: {dit_gb / 2:.1f} GB of bf16 weights for both experts")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
