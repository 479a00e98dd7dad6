"""Resume on CUDA in bf16 with a tiny random I2V checkpoint: the resumed latent and video equal the uninterrupted
ones within bf16 noise (on one GPU and one layout they are expected to be identical; the bound is the promise).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.i2v import I2VModels, decode_video, prepare_i2v, sample_i2v
from pipeline.sampling import make_solver
from pipeline.sampling.checkpoint import FILE_NAME, CheckpointPolicy, CheckpointStore, Fingerprint, decode
from pipeline.sampling.moe import ExpertSwitch
from tests.workers.harness import write_tiny_checkpoint

IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "media" / "i2v_input.jpg"
STEPS, STOP = 8, 3
BF16_BOUND = 1e-2  # rel-L2; restarting from scratch or skipping a step differs by O(0.1) or more


class Interrupted(Exception):
    pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
def test_resume_on_cuda_in_bf16_stays_within_bf16_noise(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp(dir=tmp_path)) / "ckpt", "i2v")
    models = I2VModels.load(ckpt, "cuda", torch.bfloat16)
    inputs = prepare_i2v(models, IMAGE, "a lighthouse at dusk", None, max_area=64 * 96, frames=9, seed=7)
    switch = ExpertSwitch(0.9, (3.5, 3.5))

    def run(**kw: object) -> torch.Tensor:
        return sample_i2v(models, inputs, make_solver("unipc", STEPS, 5.0), switch, **kw)

    def store() -> CheckpointStore:
        return CheckpointStore(tmp_path, Fingerprint("job", "model"), CheckpointPolicy(every_steps=1),
                               layout={"device": "cuda", "dtype": "bf16"})

    def stop(_phase: str, done: int, _total: int) -> None:
        if done == STOP:
            raise Interrupted

    whole = run()
    with pytest.raises(Interrupted):
        run(checkpoint=store(), on_progress=stop)
    header, tensors = decode((tmp_path / FILE_NAME).read_bytes())
    assert header["step"] == STOP and tensors["latent"].dtype == torch.float32  # the loop's dtype, no widening
    second = store()
    resumed = run(checkpoint=second)
    assert second.resumed_from["step"] == STOP and resumed.is_cuda
    assert _rel(resumed, whole) <= BF16_BOUND
    assert _rel(decode_video(models, resumed), decode_video(models, whole)) <= BF16_BOUND
