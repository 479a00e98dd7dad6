"""Ulysses attention and CFG-parallel over real torchrun process groups (gloo, CPU) against one process.

This file is also the script torchrun runs: `torchrun ... tests/test_parallel_ulysses.py MODE OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.parallel.cfg import ParallelPlan, plan_parallel
from pipeline.parallel.ulysses import ParallelConfigError, check_heads, local_attention, supported_sizes

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, mode: str, out: Path, timeout: float = 90) -> list[dict]:
    """Run this file under torchrun with `nproc` gloo ranks; each rank writes out/rank{r}.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, mode, str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def qkv(seed: int, length: int = 12, heads: int = 4, dim: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, length, heads, dim, generator=g) for _ in range(3))


def toy_velocity(x: torch.Tensor, context: torch.Tensor, sp, k_len: int) -> torch.Tensor:
    """A stand-in DiT: shard tokens, attend (q from x, k/v shifted by the branch's context), gather back."""
    q, k, v = x, x + context, x * context
    if sp is None:
        return local_attention(q, k, v, k_len)
    local = sp.attention(sp.shard(q, 1), sp.shard(k, 1), sp.shard(v, 1), k_len)
    return sp.gather(local, 1)


def guided_reference(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, k_len: int, g: float):
    vc, vu = toy_velocity(x, cond, None, k_len), toy_velocity(x, uncond, None, k_len)
    return vu + g * (vc - vu)


# --- run inside torchrun ---------------------------------------------------------------------------


def run_ulysses(out: Path) -> dict:
    import torch.distributed as dist

    from pipeline.parallel.ulysses import UlyssesParallel

    sp = UlyssesParallel()
    result: dict = {"rank": sp.rank, "world_size": sp.world_size}
    for name, k_len in (("full", 12), ("padded", 9)):  # 9 of 12 tokens real: padding keys excluded
        q, k, v = qkv(seed=7)
        expected = local_attention(q, k, v, k_len)
        got = sp.gather(sp.attention(sp.shard(q, 1), sp.shard(k, 1), sp.shard(v, 1), k_len), 1)
        result[name] = float((got - expected).abs().max())
    # the same sequence on every rank after gather, in rank order
    result["gather_order"] = sp.gather(torch.full((1, 2), float(sp.rank)), 1).tolist()
    try:
        sp.shard(torch.zeros(1, 5, 4, 8), 1)
    except ParallelConfigError as exc:
        result["shard_error"] = str(exc)
    try:
        sp.attention(*(t[:, :6, :3] for t in qkv(seed=1)), None)
    except ParallelConfigError as exc:
        result["heads_error"] = str(exc)
    dist.barrier()
    return result


def run_cfg(out: Path) -> dict:
    import torch.distributed as dist

    from pipeline.parallel.cfg import CfgParallel

    cfg = CfgParallel()
    x, cond, uncond = qkv(seed=3)
    context = cond if cfg.branch == 0 else uncond
    v = toy_velocity(x, context, cfg.sp, k_len=10)
    guided = cfg.guide(v, scale=3.5)
    expected = guided_reference(x, cond, uncond, 10, 3.5)
    dist.barrier()
    return {"branch": cfg.branch, "ulysses": 1 if cfg.sp is None else cfg.sp.world_size,
            "diff": float((guided - expected).abs().max()), "checksum": float(guided.double().sum())}


def main(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = Path(out_dir)
    result = {**run_ulysses(out), **run_cfg(out)} if mode == "all" else {"ulysses": run_ulysses, "cfg": run_cfg}[mode](out)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --- tests ---------------------------------------------------------------------------------------


def test_supported_sizes_for_40_heads() -> None:
    assert [n for n in supported_sizes(40) if n <= 8] == [1, 2, 4, 5, 8]
    check_heads(40, 8)
    with pytest.raises(ParallelConfigError, match=r"got 3 ranks.*40 attention heads.*1, 2, 4, 5, 8, 10"):
        check_heads(40, 3)


def test_plan_parallel_layouts() -> None:
    assert plan_parallel(4, 40, cfg_parallel=True) == ParallelPlan(4, 2, 2)
    assert plan_parallel(4, 40, cfg_parallel=False) == ParallelPlan(4, 1, 4)
    assert plan_parallel(2, 40, cfg_parallel=True, needs_cfg=False) == ParallelPlan(2, 1, 2)
    with pytest.raises(ParallelConfigError, match="even"):
        plan_parallel(3, 40, cfg_parallel=True)
    with pytest.raises(ParallelConfigError, match="got 6 ranks"):
        plan_parallel(6, 40, cfg_parallel=False)
    with pytest.raises(ParallelConfigError, match="got 3 ranks"):  # 6 GPUs as 2 x 3: 3 does not divide 40
        plan_parallel(6, 40, cfg_parallel=True)


def test_local_attention_excludes_padding_keys() -> None:
    q, k, v = qkv(seed=5)
    cut = local_attention(q, k[:, :9], v[:, :9], None)
    assert torch.allclose(local_attention(q, k, v, 9), cut)
    assert torch.allclose(local_attention(q, k, v, torch.tensor([9])), cut)
    assert not torch.allclose(local_attention(q, k, v, None), cut)


@pytest.mark.slow
def test_ulysses_and_cfg_parallel_on_four_ranks_match_one_process(tmp_path) -> None:
    ranks = torchrun(4, "all", tmp_path)  # one launch: Ulysses over 4, then CFG halves of 2 with Ulysses inside
    for r in ranks:
        assert r["world_size"] == 4
        assert r["full"] < 1e-6 and r["padded"] < 1e-6, r
        assert r["gather_order"] == [[0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]
        assert "size 5" in r["shard_error"] and "multiple of the Ulysses size 4" in r["shard_error"]
        assert "got 4 ranks for a model with 3 attention heads" in r["heads_error"]
    assert [r["branch"] for r in ranks] == [0, 0, 1, 1]
    assert all(r["ulysses"] == 2 for r in ranks)
    assert all(r["diff"] < 1e-5 for r in ranks), ranks
    assert len({r["checksum"] for r in ranks}) == 1, "every rank must hold the same guided velocity"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
