"""Resume through the real warm pool: a torchrun worker on the CPU (gloo, tiny random I2V checkpoint) is
SIGKILLed after it checkpointed some step, a new pool is launched, the same `run` command is sent again, and
the mp4 it delivers decodes to the same frames as an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.sampling.checkpoint import FILE_NAME, decode
from pipeline.video import read_mp4
from tests.test_worker_pool import Supervisor, run_command
from tests.workers.harness import write_tiny_checkpoint

STEPS = 40  # enough that the kill lands long before the last step (a tiny step takes milliseconds)
KILL_AFTER = 3
# Lossless H.264: libx264 at its default crf is not reproducible on a loaded machine (the same frames encode
# to different bytes now and then, seen ~1 in 12 under load), while lossless output decodes to exactly the
# frames it was given; so equal decoded frames here mean equal video tensors.
LOSSLESS = 0


@pytest.fixture(scope="module")
def tiny_i2v() -> Path:
    out = Path(tempfile.mkdtemp(prefix="wanbox-tiny-resume-"))
    yield write_tiny_checkpoint(out / "ckpt", "i2v")
    shutil.rmtree(out, ignore_errors=True)


def launch(workdir: Path, ckpt: Path, nproc: int) -> tuple[Supervisor, dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(workdir, ckpt, nproc=nproc)
    hello, _ = sup.until(("hello",))
    sup.until(("ready",))
    return sup, hello


def sampling_steps(messages: list[dict]) -> list[int]:
    return [m["step"] for m in messages if m["type"] == "progress" and m["phase"] == "sampling"]


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "relaunched"), [(1, 1), (2, 2), (1, 2)])
def test_a_pool_killed_mid_job_resumes_at_its_checkpoint_and_delivers_the_same_video(
    tiny_i2v: Path, tmp_path: Path, nproc: int, relaunched: int
) -> None:
    """(1, 2): the relaunched pool has another world size: allowed, said in the stats, equal within rounding."""
    resume_dir = tmp_path / "work" / "resume"
    command = run_command("job-r", tmp_path, steps=STEPS, frames=9) | {"crf": LOSSLESS,
        "resume": {"dir": str(resume_dir), "every_steps": 1, "every_seconds": None}}

    sup, hello = launch(tmp_path / "pool-1", tiny_i2v, nproc)
    try:
        sup.chan.send(command)
        while not any(s >= KILL_AFTER for s in sampling_steps([sup.recv()])):
            pass
        rank0 = next(d["pid"] for d in hello["devices"] if d["rank"] == 0)
        os.kill(rank0, signal.SIGKILL)  # the worker process dies mid-job, as a preempted pod would
        assert sup.proc.wait(timeout=60) != 0
    finally:
        sup.close()
    assert not Path(command["output"]).exists()
    saved = decode((resume_dir / FILE_NAME).read_bytes())[0]["step"]
    assert KILL_AFTER <= saved < STEPS, "the checkpoint holds the step reported before the kill (or a later one)"

    sup, _ = launch(tmp_path / "pool-2", tiny_i2v, relaunched)
    try:
        sup.chan.send(command)  # the supervisor's retry: the very same command
        done, seen = sup.until(("done", "error"))
        assert done["type"] == "done", f"{done}\n{sup.logs()}"
        changed = [] if relaunched == nproc else ["ulysses", "world_size"]
        assert done["stats"]["resumed_from"] == {"clip": 0, "step": saved, "expert": "high_noise_model",
                                                 "layout_changed": changed}
        assert sampling_steps(seen) == [0, *range(saved, STEPS + 1)], "progress resumes at the saved step"
        assert done["stats"]["checkpoint"]["writes"] == STEPS - saved and done["stats"]["checkpoint"]["ignored"] is None
        assert not (resume_dir / FILE_NAME).exists(), "cleared once the mp4 is written"

        # the same job, never interrupted, no checkpoints
        sup.chan.send(run_command("job-u", tmp_path, steps=STEPS, frames=9) | {"crf": LOSSLESS})
        plain, _ = sup.until(("done", "error"))
        assert plain["type"] == "done" and "resumed_from" not in plain["stats"], plain
    finally:
        sup.close()
    resumed, uninterrupted = read_mp4(done["output"])[0], read_mp4(plain["output"])[0]
    assert resumed.shape == uninterrupted.shape == (9, plain["stats"]["height"], plain["stats"]["width"], 3)
    if relaunched == nproc:
        assert np.array_equal(resumed, uninterrupted)
    else:  # bitwise not promised (other token shards per rank; on this tiny CPU model it happens to be)
        assert np.abs(resumed.astype(int) - uninterrupted.astype(int)).max() <= 2
