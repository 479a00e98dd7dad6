"""The warm pool with the Animate family: 2 gloo ranks (Ulysses), tiny random Animate checkpoint, a
preprocessed src folder, driven over a real Unix socket; the mp4 is checked by decoding.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from daemon import protocol
from pipeline.video import probe, write_mp4
from tests.jobs import resolved_job
from tests.test_worker_pool import Supervisor
from tests.workers.harness import write_tiny_checkpoint

H, W, FACE = 16, 32, 32  # pose frames; the tiny motion encoder takes 32x32 face crops


@pytest.fixture(scope="module")
def tiny_animate() -> Path:
    out = Path(tempfile.mkdtemp(prefix="wanbox-tiny-animate-"))
    yield write_tiny_checkpoint(out / "ckpt", "animate")
    shutil.rmtree(out, ignore_errors=True)


def write_src(folder: Path, frames: int) -> dict[str, str]:
    """What animate preprocessing leaves in work/<id>/animate (animation mode), as run inputs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    pose = torch.from_numpy(rng.uniform(-1, 1, (3, frames, H, W))).float()
    face = torch.from_numpy(rng.uniform(-1, 1, (3, frames, FACE, FACE))).float()
    write_mp4(pose, folder / "src_pose.mp4", 30)
    write_mp4(face, folder / "src_face.mp4", 30)
    cv2.imwrite(str(folder / "src_ref.png"), rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    return {"pose": str(folder / "src_pose.mp4"), "face": str(folder / "src_face.mp4"),
            "ref": str(folder / "src_ref.png")}


def animate_command(job: str, workdir: Path, inputs: dict[str, str]) -> protocol.Run:
    spec = resolved_job("animate", prompt=None, size="1280*720", frames=None, fps=30, steps=2, seed=3,
                        animate='mode = "animation"\nrefert_num = 1\nclip_len = 5')
    return protocol.Run(job=job, kind="animate", params=spec, inputs=inputs, output=str(workdir / f"{job}.mp4"))


@pytest.mark.slow
def test_animate_pool_runs_a_job_and_refuses_the_other_kind(tiny_animate, tmp_path) -> None:
    sup = Supervisor(tmp_path, tiny_animate, model="animate-14B")
    try:
        hello, _ = sup.until(("hello",))
        assert hello["model"] == "animate-14B" and hello["parallel"]["ulysses"] == 2
        assert hello["parallel"]["text_encoder"] == "rank0"  # embeddings broadcast to rank 1
        sup.until(("ready",))
        inputs = write_src(tmp_path / "animate", frames=7)
        sup.chan.send(animate_command("anim-1", tmp_path, inputs))
        done, seen = sup.until(("done", "error"))
        assert done["type"] == "done", f"{done}\n{sup.logs()}"
        assert probe(done["output"]) == (7, W, H, 30.0), "the driving video's length and the pose frame size"
        # 7 frames with clip_len 5, refert 1: two clips of two steps, counted across clips
        assert [m["step"] for m in seen if m["phase"] == "sampling" and m["step"]] == [1, 2, 3, 4]

        sup.run("i2v-on-animate-pool")
        error, _ = sup.until(("done", "error"))
        assert error["kind"] == "input" and "animate-14B" in error["message"]
    finally:
        sup.close()
