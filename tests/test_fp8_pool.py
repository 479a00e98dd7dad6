"""`--precision fp8` through a real warm pool on the CPU (one gloo rank, tiny random I2V checkpoint): the flag
reaches the model load, and the pool's video is the one that the FP8 models make in this process, not the
one of the float32 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.video import probe, read_mp4, write_mp4
from tests.test_worker_pool import IMAGE, MAX_AREA, Supervisor, tiny_i2v  # noqa: F401 - tiny_i2v is a fixture

pytestmark = pytest.mark.slow


def _one_process_video(ckpt: Path, out: Path, precision: str) -> np.ndarray:
    from pipeline.i2v import I2VModels, generate_i2v
    from pipeline.models.fp8 import apply_precision

    models = I2VModels.load(ckpt, "cpu", torch.float32)
    for expert in (models.high_noise, models.low_noise):
        apply_precision(expert, precision)
    video = generate_i2v(models, IMAGE, "a lighthouse at dusk", None, max_area=MAX_AREA, frames=5, steps=2,
                         shift=5.0, guide_scale=(3.5, 3.5), solver="unipc", seed=42)  # fmt: skip
    return read_mp4(write_mp4(video, out, fps=16))[0].astype(np.int16)


def test_fp8_pool_makes_the_fp8_video(tiny_i2v: Path, tmp_path: Path) -> None:  # noqa: F811
    sup = Supervisor(tmp_path, tiny_i2v, nproc=1, extra=("--precision", "fp8"))
    try:
        ready, _ = sup.until(("ready", "error"))
        assert ready["type"] == "ready", sup.logs()
        sup.run("job-fp8", steps=2, frames=5, seed=42)
        done, _ = sup.until(("done", "error"))
        assert done["type"] == "done", f"{done}\n{sup.logs()}"
    finally:
        sup.close()
    assert probe(done["output"])[0] == 5
    got = read_mp4(done["output"])[0].astype(np.int16)
    fp8 = _one_process_video(tiny_i2v, tmp_path / "fp8.mp4", "fp8")
    full = _one_process_video(tiny_i2v, tmp_path / "fp32.mp4", "bf16")
    assert np.abs(got - fp8).mean() < 0.5, "the pool's video is not the FP8 models' video"
    assert np.abs(got - fp8).mean() < np.abs(got - full).mean()
