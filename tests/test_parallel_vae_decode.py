"""The VAE decode pipelined over decoder layers across 3 gloo ranks equals one process, bit for bit (whole or\nstreamed to rank 0 frame by frame).

Real VAE weights from the reference fixtures; this file is also the torchrun script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.parallel.vae_decode import balanced_groups

REPO = Path(__file__).resolve().parents[1]
VAE_FILE = REPO.parent / "shared" / "fixtures" / "wan_ref" / "vae" / "Wan2.1_VAE.pth"


def latent() -> torch.Tensor:
    return torch.randn(16, 4, 4, 6, generator=torch.Generator().manual_seed(11))  # 4 latent -> 13 frames


def main(out: str) -> None:
    import torch.distributed as dist

    from pipeline.models.vae import WanVAE
    from pipeline.parallel.vae_decode import decode_pipelined

    dist.init_process_group("gloo")
    vae = WanVAE.from_checkpoint(VAE_FILE)
    video = decode_pipelined(vae, latent())
    chunks: list[torch.Tensor] = []  # streamed: rank 0 is handed each latent frame's pixels as they exist
    assert decode_pipelined(vae, latent(), on_frames=chunks.append) is None
    if dist.get_rank() == 0:
        torch.save({"video": video, "chunks": chunks}, out)
    else:
        assert video is None and chunks == []
    dist.destroy_process_group()


def test_balanced_groups_are_contiguous_non_empty_and_even() -> None:
    assert balanced_groups([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balanced_groups([8, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]  # one heavy layer is a stage alone
    assert balanced_groups([3, 1, 1, 1, 2, 2], 3) == [(0, 1), (1, 4), (4, 6)]  # stages cost 3, 3, 4
    assert balanced_groups([0.0, 0.0, 5.0], 3) == [(0, 1), (1, 2), (2, 3)]  # never an empty stage
    with pytest.raises(ValueError, match="3 decoder layers into 4"):
        balanced_groups([1, 1, 1], 4)


@pytest.mark.slow
def test_three_rank_pipelined_decode_equals_one_process(tmp_path) -> None:
    from pipeline.models.vae import WanVAE

    out = tmp_path / "video.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", __file__, str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.set_num_threads(1)
    expected = WanVAE.from_checkpoint(VAE_FILE).decode(latent())
    output, _ = run.communicate(timeout=180)
    assert run.returncode == 0, output[-4000:]
    saved = torch.load(out)
    got = saved["video"]
    assert got.shape == expected.shape == (3, 13, 32, 48)
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max():.3e}"
    assert [c.shape[1] for c in saved["chunks"]] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(saved["chunks"], dim=1), expected)


if __name__ == "__main__":
    main(sys.argv[1])
