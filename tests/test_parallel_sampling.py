"""The I2V denoising loop on 2 ranks (Ulysses, CFG-parallel, FSDP2 + Ulysses) gives the 1-process latent.

Real reference-fixture experts, the real solver and MoE switch; gloo on the CPU, NCCL on 2 GPUs (marked gpu).
This file is also the torchrun script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIT_I2V = REPO.parent / "shared" / "fixtures" / "wan_ref" / "dit_i2v"
GRID = (3, 6, 10)  # latent [T, h, w]: 3 * 3 * 5 = 45 tokens, odd, so 2 ranks need one padding token
STEPS = 4  # UniPC with shift 5: timesteps 999, 937 (high-noise expert), 833, 624 (low-noise expert)


def sample(sp, guidance, fsdp: bool = False, device: str = "cpu", guide: tuple[float, float] = (3.5, 2.0),
           forwards: list[int] | None = None) -> torch.Tensor:
    """Fixed seeded inputs through sample_i2v with the given sequence-parallel object and guidance; `forwards`
    (a list) receives how many expert forwards this process ran."""
    from pipeline.i2v import I2VInputs, I2VModels, sample_i2v, sequence_length
    from pipeline.sampling import make_solver
    from pipeline.sampling.moe import ExpertSwitch
    from pipeline.weights.loader import load_i2v_experts

    dev = torch.device(device)
    high, low = load_i2v_experts(DIT_I2V, dtype=torch.float32, device="cpu" if fsdp else dev)
    if fsdp:  # each rank keeps half of every weight; blocks gather theirs just in time
        from pipeline.parallel.sharding import shard_module

        high, low = shard_module(high, dev), shard_module(low, dev)
    models = I2VModels(high, low, vae=None, text_encoder=None, device=dev, dtype=torch.float32)
    count = [0]
    for expert in (high, low):
        expert.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    g = torch.Generator().manual_seed(2024)
    t, h, w = GRID
    y = torch.cat([torch.zeros(4, t, h, w).index_fill_(1, torch.tensor([0]), 1.0),
                   torch.randn(16, t, h, w, generator=g)])
    noise = torch.randn(16, t, h, w, generator=g)
    context, context_null = torch.randn(7, 4096, generator=g), torch.randn(5, 4096, generator=g)
    y, noise, context, context_null = (x.to(dev) for x in (y, noise, context, context_null))
    inputs = I2VInputs(y, noise, context, context_null, sequence_length(t, h, w, sp), w * 8, h * 8, 9)
    solver = make_solver("unipc", STEPS, 5.0)
    switch = ExpertSwitch(boundary=0.9, guide_scale=guide)  # different scales: the switch must matter
    latent = sample_i2v(models, inputs, solver, switch, guidance=guidance, sp=sp).cpu()
    if forwards is not None:
        forwards.append(count[0])
    return latent


def main(out_dir: str, device: str) -> None:
    import torch.distributed as dist

    from pipeline.parallel.cfg import CfgParallel
    from pipeline.parallel.ulysses import UlyssesParallel

    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # float32 means float32 (the patch-embedding conv)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    results = {"ulysses": sample(UlyssesParallel(), None, device=device)}
    cfg = CfgParallel()
    results["cfg"] = sample(cfg.sp, cfg, device=device)
    results["fsdp+ulysses"] = sample(UlyssesParallel(), None, fsdp=True, device=device)
    forwards: list[int] = []
    results["cfg-guide1"] = sample(cfg.sp, cfg, device=device, guide=(1.0, 1.0), forwards=forwards)
    results["cfg-guide1-forwards"] = forwards[0]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def check_two_ranks(tmp_path: Path, device: str, tolerance: float) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           str(tmp_path), device]
    # math attention: float32 end to end on CUDA too (the fused kernels would compute in bf16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1", "WANBOX_ATTENTION": "math"}
    run = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.set_num_threads(1)
    expected = sample(None, None, device=device)  # one process, sequential guidance, while torchrun runs
    forwards: list[int] = []
    unguided = sample(None, None, device=device, guide=(1.0, 1.0), forwards=forwards)
    output, _ = run.communicate(timeout=180)
    assert run.returncode == 0, output[-4000:]
    scale = expected.abs().max()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in ("ulysses", "cfg", "fsdp+ulysses"):
            diff = (got[mode] - expected).abs().max() / scale
            assert diff < tolerance, f"rank {rank} {mode}: relative max diff {diff:.2e}"
        # guidance 1 (distilled presets): the unconditional half runs no forward at all, and both halves get the
        # conditional velocity: the sequential guide-1 latent (one forward per step there too)
        diff = (got["cfg-guide1"] - unguided).abs().max() / unguided.abs().max()
        assert diff < tolerance, f"rank {rank} cfg guide 1: relative max diff {diff:.2e}"
        assert got["cfg-guide1-forwards"] == (STEPS if rank == 0 else 0), got["cfg-guide1-forwards"]
    assert forwards == [STEPS]
    assert torch.isfinite(expected).all() and not torch.allclose(expected, torch.zeros_like(expected))


@pytest.mark.slow
def test_two_ranks_ulysses_cfg_parallel_and_fsdp_match_one_process(tmp_path) -> None:
    check_two_ranks(tmp_path, "cpu", 1e-5)


@pytest.mark.gpu
def test_two_gpus_ulysses_cfg_parallel_and_fsdp_match_one_gpu(tmp_path, monkeypatch) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from pipeline.models import attention

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(attention, "BACKEND", "math")
    check_two_ranks(tmp_path, "cuda", 1e-4)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
