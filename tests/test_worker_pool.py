"""The warm pool driven over a real Unix socket by this test acting as the supervisor.

A real torchrun group of 2 gloo ranks on the CPU with a tiny random I2V checkpoint: jobs, a cancel, bad
input, shutdown, and a rank that dies. Outputs are real mp4 files checked by decoding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import protocol
from pipeline.video import probe
from tests.jobs import resolved_job
from tests.workers.harness import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "media" / "i2v_input.jpg"
MAX_AREA = 48 * 64  # tiny: a 6x8 or 8x6 latent


@pytest.fixture(scope="module")
def tiny_i2v() -> Path:
    out = Path(tempfile.mkdtemp(prefix="wanbox-tiny-"))
    yield write_tiny_checkpoint(out / "ckpt", "i2v")
    shutil.rmtree(out, ignore_errors=True)


class Supervisor:
    """The supervisor's side of the seam, just enough to drive a pool: listen, launch, talk."""

    def __init__(self, workdir: Path, ckpt: Path, nproc: int = 2, extra: tuple[str, ...] = (),
                 model: str = "i2v-A14B") -> None:
        # AF_UNIX paths are short; pytest's tmp paths can be long, so the socket gets its own short dir.
        self.sockdir = Path(tempfile.mkdtemp(prefix="wb-"))
        self.server = protocol.listen(self.sockdir / "pool.sock")
        self.server.settimeout(120)
        self.workdir = workdir
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pipeline.worker", "--model", model, "--socket", str(self.sockdir / "pool.sock"),
               "--checkpoint-dir", str(ckpt), "--device", "cpu", "--max-area", str(MAX_AREA), *extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
        self.log = open(workdir / "pool.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        conn, _ = self.server.accept()
        self.chan = protocol.Channel(conn)

    def recv(self, timeout: float = 120) -> dict:
        msg = self.chan.recv(timeout=timeout)
        assert msg is not None, "the pool closed the socket:\n" + self.logs()
        return msg

    def until(self, kinds: tuple[str, ...], timeout: float = 120) -> tuple[dict, list[dict]]:
        """Read messages until one of `kinds`; returns it and everything read before it."""
        seen = []
        while True:
            msg = self.recv(timeout)
            if msg["type"] in kinds:
                return msg, seen
            seen.append(msg)

    def run(self, job: str, **overrides) -> None:
        self.chan.send(run_command(job, self.workdir, **overrides))

    def logs(self) -> str:
        self.log.flush()
        return (self.workdir / "pool.log").read_text()[-6000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.chan.close()
        self.server.close()
        self.log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def run_command(job: str, workdir: Path, steps: int = 2, frames: int = 5, seed: int = 42,
                image: Path = IMAGE) -> protocol.Run:
    """A `run` message carrying a resolved job as the manifest parser makes it (frames may break its rules:
    the pool must refuse what the pipeline cannot do)."""
    spec = resolved_job(prompt="a lighthouse at dusk", steps=steps, seed=seed)
    spec = replace(spec, video=replace(spec.video, frames=frames))
    return protocol.Run(job=job, kind="i2v", params=spec, inputs={"image": str(image)},
                        output=str(workdir / f"{job}.mp4"))


@pytest.fixture(scope="module")
def pool(tiny_i2v, tmp_path_factory):
    sup = Supervisor(tmp_path_factory.mktemp("pool"), tiny_i2v)
    yield sup
    sup.close()


def test_hello_and_ready(pool) -> None:
    hello = pool.recv()
    assert hello["type"] == "hello", pool.logs()
    assert hello["model"] == "i2v-A14B" and hello["world_size"] == 2
    assert [d["rank"] for d in hello["devices"]] == [0, 1]
    assert hello["parallel"] == {"world_size": 2, "cfg": 1, "ulysses": 2, "sharding": "replicate",
                                 "text_encoder": "rank0"}
    import torch

    # the sidecar's versions and resolution cap, reported by the worker (the supervisor never imports torch)
    assert hello["runtime"] == {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": 1,
                                "max_area": MAX_AREA}
    ready = pool.recv()
    assert ready["type"] == "ready" and ready["load_seconds"] > 0


def test_two_jobs_on_one_pool_second_without_model_load(pool, tiny_i2v) -> None:
    pool.run("job-a", steps=2)
    done, seen = pool.until(("done", "error"))
    assert done["type"] == "done", done
    sampling = [m["step"] for m in seen if m["type"] == "progress" and m["phase"] == "sampling"]
    assert sampling[-2:] == [1, 2], "progress after every denoising step"
    assert {m["phase"] for m in seen} >= {"encode", "sampling", "decode", "write"}
    stats = done["stats"]
    assert stats["model_load"] is True and stats["load_seconds"] > 0 and stats["attention"] == "sdpa"
    assert probe(done["output"]) == (5, stats["width"], stats["height"], 16.0)
    assert stats["width"] * stats["height"] <= MAX_AREA and len(stats["peak_memory"]) == 2
    assert set(stats["phases"]) == {"encode", "sampling", "decode", "write"}
    config_sha = hashlib.sha256((tiny_i2v / "high_noise_model" / "config.json").read_bytes()).hexdigest()
    assert stats["checkpoints"]["high_noise_model/config.json"] == f"sha256:{config_sha}"

    assert_same_video_as_one_process(done["output"], tiny_i2v, steps=2, frames=5, seed=42)

    pool.run("job-b", steps=3, frames=9, seed=7)
    done, seen = pool.until(("done", "error"))
    assert done["type"] == "done" and done["job"] == "job-b", done
    assert done["stats"]["model_load"] is False and "load_seconds" not in done["stats"]
    assert probe(done["output"])[0] == 9
    assert [m["step"] for m in seen if m["phase"] == "sampling"][-3:] == [1, 2, 3]


def assert_same_video_as_one_process(output: str, ckpt: Path, steps: int, frames: int, seed: int) -> None:
    """The pool's mp4 (2 ranks: Ulysses, T5 on rank 0, pipelined decode) shows the video that generate_i2v
    makes in this one process, encoded the same way."""
    import numpy as np
    import torch

    from pipeline.i2v import I2VModels, generate_i2v
    from pipeline.video import read_mp4, write_mp4

    models = I2VModels.load(ckpt, "cpu", torch.float32)
    video = generate_i2v(models, IMAGE, "a lighthouse at dusk", None, max_area=MAX_AREA, frames=frames,
                         steps=steps, shift=5.0, guide_scale=(3.5, 3.5), solver="unipc", seed=seed)
    expected = read_mp4(write_mp4(video, Path(output).with_name("one-process.mp4"), fps=16))[0].astype(np.int16)
    got = read_mp4(output)[0].astype(np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 0.5, "the pool's video differs from the one-process video"


def test_bad_input_gives_an_error_and_the_pool_stays_up(pool) -> None:
    pool.run("job-bad-frames", frames=6)
    error, _ = pool.until(("done", "error"))
    assert error["type"] == "error" and error["job"] == "job-bad-frames"
    assert error["kind"] == "input" and not error["retryable"]
    assert "frames" in error["message"] and "6" in error["message"] and "4n+1" in error["message"]

    pool.run("job-missing-image", image=pool.workdir / "nope.png")
    error, _ = pool.until(("done", "error"))
    assert error["kind"] == "input" and "nope.png" in error["message"]

    pool.run("job-after-errors")
    done, _ = pool.until(("done", "error"))
    assert done["type"] == "done" and Path(done["output"]).is_file()


def test_cancel_stops_within_one_step(pool) -> None:
    pool.run("job-long", steps=30)
    while True:
        msg = pool.recv()
        if msg["type"] == "progress" and msg["phase"] == "sampling" and msg["step"] >= 1:
            break
    pool.chan.send(protocol.Cancel(job="job-long"))
    cancelled_at = msg["step"]
    error, seen = pool.until(("done", "error"))
    assert error["type"] == "error" and error["kind"] == "cancelled", error
    steps_after = [m["step"] for m in seen if m["type"] == "progress" and m["phase"] == "sampling"]
    assert len(steps_after) <= 1 and all(s <= cancelled_at + 1 for s in steps_after), steps_after
    assert not (pool.workdir / "job-long.mp4").exists()


def test_shutdown_during_a_job_reports_it_and_exits_cleanly(pool) -> None:
    pool.run("job-interrupted", steps=30)
    pool.until(("progress",))
    pool.chan.send(protocol.Shutdown())
    error, _ = pool.until(("done", "error"))
    assert error["kind"] == "cancelled" and error["retryable"] is True
    assert pool.proc.wait(timeout=60) == 0, pool.logs()
    assert pool.chan.recv(timeout=10) is None


def test_cfg_parallel_fsdp_pool_runs_a_job_then_a_dead_rank_ends_it(tiny_i2v, tmp_path) -> None:
    sup = Supervisor(tmp_path, tiny_i2v, extra=("--cfg-parallel", "--sharding", "fsdp"))
    try:
        hello, _ = sup.until(("hello",))
        assert hello["parallel"]["cfg"] == 2 and hello["parallel"]["sharding"] == "fsdp"
        sup.until(("ready",))
        sup.run("job-cfg", steps=2)
        done, _ = sup.until(("done", "error"))
        assert done["type"] == "done", f"{done}\n{sup.logs()}"
        assert probe(done["output"])[0] == 5

        rank1 = next(d["pid"] for d in hello["devices"] if d["rank"] == 1)
        os.kill(rank1, signal.SIGKILL)
        started = time.monotonic()
        code = sup.proc.wait(timeout=60)
        assert code != 0, "torchrun must report the failure so the supervisor relaunches"
        assert time.monotonic() - started < 30
        assert sup.chan.recv(timeout=10) is None, "rank 0 must go away, not hang"
    finally:
        sup.close()


def test_a_checkpoint_that_cannot_load_is_reported_without_a_job(tmp_path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    sup = Supervisor(tmp_path, missing, nproc=1)
    try:
        error, _ = sup.until(("error",), timeout=60)
        assert error["job"] is None and error["kind"] == "internal" and error["retryable"] is False
        assert "could not load i2v-A14B" in error["message"] and str(missing) in error["message"]
        assert sup.proc.wait(timeout=60) != 0
    finally:
        sup.close()
