"""End to end through `wanbox serve` with the REAL warm pool (pipeline.worker under torchrun, gloo, tiny models).

The fake worker stands in for the GPU elsewhere; here nothing does: real manifests become real videos through
the supervisor, the CPU preprocessing pool, the torchrun worker and the outbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline.video import probe
from tests.conftest import MEDIA
from tests.workers.harness import Root, manifest_text, real_pool, wait_for, write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from mediapipe_models import mediapipe_models_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def faulty_pool(ckpt: Path, marker: Path, where: str, *worker_args: str, nproc: int = 2) -> dict:
    """A real pool with one fault injected once (`where`: attention, load or checkpoint:N; tests/workers)."""
    pool = real_pool("i2v-A14B", ckpt, nproc, "--failure-grace", "2", *worker_args, max_area=4096)
    pool["command"] = [part if part != "pipeline.worker" else "tests.workers.faulty_rank_worker"
                       for part in pool["command"]]  # fmt: skip
    pool["env"].update(WANBOX_TEST_FAULT=where, WANBOX_TEST_FAULT_MARKER=str(marker))
    return pool


def worker_rank_pids(socket: Path, rank: int) -> list[int]:
    """The pipeline.worker processes of this pool (by its socket) that torchrun started as `rank`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipeline.worker" in cmdline and str(socket).encode() in cmdline and f"RANK={rank}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def sidecar_of(root: Root, name: str) -> dict:
    return json.loads((root.outbox / f"{name}.json").read_text())


def wait_sampling_step(root: Root, name: str, step: int, timeout: float = 240) -> None:
    def reached() -> bool:
        job = root.job(name)
        # the denoising phase: in state sampling the pool first reports the encode's steps of its own
        return job is not None and job.state.value == "sampling" and job.phase == "sampling" and (job.step or 0) >= step

    wait_for(reached, timeout, lambda: f"{name}: {root.job(name)}\n{root.log_text()[-3000:]}")


def test_i2v_jobs_reuse_a_two_process_pool_survive_a_killed_rank_and_cancel(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny-i2v", "i2v")
    root = Root(tmp_path, pool=real_pool("i2v-A14B", ckpt, 2, max_area=4096), jobs={"max_attempts": 3})
    try:
        root.serve()
        # 1. a job, delivered as a decodable mp4 with a complete sidecar
        root.drop("first", manifest_text(frames=5, steps=3, sampling="seed = 7\n"))
        root.wait_state("first", "done", timeout=300)
        first = sidecar_of(root, "first")
        frames, width, height, fps = probe(root.outbox / "first.mp4")
        assert (frames, fps) == (5, 16) and (width, height) == (first["video"]["width"], first["video"]["height"])
        assert first["seed"] == 7 and first["model_load"] is True and first["pool"]["world_size"] == 2
        assert first["attention"] == "sdpa"  # the kernel that ran: torch SDPA on the CPU
        for key in ("parameters", "timings_seconds", "gpu_seconds", "checkpoints", "software", "attempts"):
            assert first[key] not in (None, {}, ""), key
        assert (root.outbox / "first.jpg").is_file()

        # 2. the next job runs on the same warm pool: no model load
        root.drop("second", manifest_text(frames=5, steps=3, sampling="seed = 8\n"))
        root.wait_state("second", "done", timeout=120)
        assert sidecar_of(root, "second")["model_load"] is False

        # 3. one rank killed mid-job: the pool is relaunched and the job retried to completion
        root.drop("victim", manifest_text(frames=5, steps=100, sampling="seed = 9\n"))  # seconds: time to kill
        wait_sampling_step(root, "victim", 2)
        victims = worker_rank_pids(root.socket, 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        job = root.wait_state("victim", "done", timeout=400)
        assert job.attempts >= 1 and sidecar_of(root, "victim")["attempts"] >= 2
        with root.ledger() as ledger:
            moves = [(e.from_state, e.to_state) for e in ledger.events(job.id)]
        assert ("sampling", "ready") in [(str(a), str(b)) for a, b in moves], moves  # requeued for the GPUs
        assert sidecar_of(root, "victim")["model_load"] is True  # a fresh pool loaded the model again
        assert probe(root.outbox / "victim.mp4")[0] == 5

        # 4. cancel mid-job: the pool stops at the next step and is free for the next job at once
        root.drop("cancelme", manifest_text(frames=41, steps=100, sampling="seed = 10\n"))
        wait_sampling_step(root, "cancelme", 2)
        started = time.monotonic()
        with root.ledger() as ledger:  # what `wanbox cancel` does (tests/test_cli.py covers the command)
            ledger.cancel(root.job("cancelme").id, "cancelled by the test")
        root.drop("after", manifest_text(frames=5, steps=2, sampling="seed = 11\n"))
        root.wait_state("after", "done", timeout=240)
        stopped = root.job("cancelme")
        assert stopped.state.value == "cancelled" and not (root.outbox / "cancelme.mp4").exists()
        assert (stopped.step or 0) < 100, "the pool ran the cancelled job to its end"
        assert "telling the pool to stop at the next step" in root.log_text() and time.monotonic() - started < 120
        assert root.stop() == 0
    finally:
        root.cleanup()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_rank_failing_mid_collective_is_reported_at_once_and_the_job_retried(tmp_path: Path, device: str) -> None:
    """Rank 1 raises while rank 0 waits in a collective (600 s timeout): rank 0's failure watch reports rank
    1's error within the grace period and ends the pool; the relaunched pool runs the retry to the end."""
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            pytest.skip("needs 2 GPUs")
    marker = tmp_path / "fault-injected"
    pool = faulty_pool(write_tiny_checkpoint(tmp_path / "tiny-i2v", "i2v"), marker, "attention")
    root = Root(tmp_path, pool={**pool, "device": device}, jobs={"max_attempts": 3})
    try:
        root.serve()
        root.drop("unlucky", manifest_text(frames=5, steps=3, sampling="seed = 5\n"))
        job = root.wait_state("unlucky", "done", timeout=300)
        assert marker.exists(), "the fault was never injected"
        with root.ledger() as ledger:
            messages = [e.message for e in ledger.events(job.id)]
        reported = [m for m in messages if "rank 1: RuntimeError: injected attention fault on rank 1" in m]
        assert reported and "the pool restarts" in reported[0], messages
        assert sidecar_of(root, "unlucky")["attempts"] == 2 and probe(root.outbox / "unlucky.mp4")[0] == 5
        assert sidecar_of(root, "unlucky")["model_load"] is True  # the failed pool ended; a new one loaded
        assert "heartbeat" not in " ".join(messages).lower(), messages  # found by the watch, not the deadline
        assert root.stop() == 0
    finally:
        root.cleanup()


def test_a_rank_failing_to_load_is_reported_at_once_and_the_pool_relaunched(tmp_path: Path) -> None:
    """Rank 1 fails loading while rank 0 goes on into creating the CFG groups (a collective that would wait
    600 s): the load error is reported by rank 0's failure watch, and the relaunched pool runs the job."""
    marker = tmp_path / "fault-injected"
    pool = faulty_pool(write_tiny_checkpoint(tmp_path / "tiny-i2v", "i2v"), marker, "load", "--cfg-parallel")
    root = Root(tmp_path, pool=pool)
    try:
        root.serve()
        started = time.monotonic()
        root.drop("patient", manifest_text(frames=5, steps=2, sampling="seed = 6\n"))
        root.wait_state("patient", "done", timeout=300)
        assert marker.exists(), "the fault was never injected"
        log = root.log_text()
        assert "rank 1: could not load i2v-A14B: RuntimeError: injected load fault on rank 1" in log, log[-3000:]
        assert "the pool restarts" in log and time.monotonic() - started < 200
        assert root.stop() == 0
    finally:
        root.cleanup()


@pytest.fixture(scope="module")
def mediapipe_dir() -> Path:
    return mediapipe_models_dir()


ANIMATE_MANIFEST = """schema = 1
kind = "animate"

[inputs]
character = "character.jpg"
video = "driving.mp4"

[sampling]
steps = 2
seed = {seed}

[animate]
mode = "{mode}"
refert_num = {refert}
clip_len = 13
preprocess_fps = 6
"""


def test_animate_jobs_in_both_modes_run_two_clips_through_serve(tmp_path: Path, mediapipe_dir: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny-animate", "animate", "--face-size", "512")
    root = Root(tmp_path, pool=real_pool("animate-14B", ckpt, 1),
                preprocess={"mediapipe_dir": str(mediapipe_dir), "pose_model": "full", "max_area": 256 * 144})
    try:
        root.serve()
        cases = {"dance": ("animation", 1, 3), "swap": ("replacement", 5, 4)}
        for name, (mode, refert, seed) in cases.items():
            folder = root.inbox / name
            folder.mkdir()
            shutil.copyfile(MEDIA / "animate_character.jpg", folder / "character.jpg")
            shutil.copyfile(MEDIA / "animate_driving.mp4", folder / "driving.mp4")
            (folder / ".job.toml.tmp").write_text(ANIMATE_MANIFEST.format(mode=mode, refert=refert, seed=seed))
            (folder / ".job.toml.tmp").rename(folder / "job.toml")
        for name, (_mode, refert, _seed) in cases.items():
            job = root.wait_state(name, ("done", "failed"), timeout=600)
            assert job.state.value == "done", job.last_error
            sidecar = sidecar_of(root, name)
            frames, width, height, fps = probe(root.outbox / f"{name}.mp4")
            # 106 frames at 30 fps resampled to 6 fps: 21 frames; two clips of 13 with `refert` frames of overlap
            assert frames == 21 and (width, height) == (256, 144) and fps == 6
            assert sidecar["parameters"]["animate"]["refert_num"] == refert
            assert probe(root.outbox / f"{name}.preview.mp4")[0] == 21  # the overlay, beside the video
            # one clip gives at most clip_len = 13 frames: 21 frames took two clips, stitched and trimmed
            assert json.loads((Path(job.work_dir) / "animate" / "preprocess_stats.json").read_text())["frames"] == 21
        assert root.stop() == 0
    finally:
        root.cleanup()


def test_a_job_killed_at_step_30_of_40_resumes_there_delivers_the_same_video_and_show_says_so(
        tmp_path: Path) -> None:
    """The issue's promise through `wanbox serve`: the pool's only rank is SIGKILLed after step 30 of 40, the
    relaunched pool resumes at the checkpoint, the video equals an uninterrupted run's bit for bit (lossless
    H.264 decodes to exactly the frames it was given), and `wanbox show` says it resumed and from where."""
    import numpy as np

    from pipeline.video import read_mp4

    ckpt = write_tiny_checkpoint(tmp_path / "tiny-i2v", "i2v")
    marker = tmp_path / "killed-once"  # the rank dies once, right after writing the checkpoint of step 30
    root = Root(tmp_path, pool=faulty_pool(ckpt, marker, "checkpoint:30", nproc=1), outbox={"crf": 0},
                inbox={"dedupe": "run"},
                jobs={"max_attempts": 3, "checkpoint_every_steps": 1, "checkpoint_every_seconds": 0})
    try:
        root.serve()
        text = manifest_text(frames=41, steps=40, sampling="seed = 5\n")
        root.drop("killed", text)
        job = root.wait_state("killed", "done", timeout=400)
        shown = root.cli("show", "killed")
        assert shown.returncode == 0, shown.stderr
        line = next(ln for ln in shown.stdout.splitlines() if "resumed from its checkpoint after step" in ln)
        step = int(line.split("after step ")[1].split()[0].rstrip(",)"))
        assert marker.exists() and step == 30, line
        assert sidecar_of(root, "killed")["resumed_from"]["step"] == step and job.attempts_made == 2
        root.drop("whole", text)  # the same job again, never interrupted
        root.wait_state("whole", "done", timeout=300)
        assert sidecar_of(root, "whole")["resumed_from"] is None
        resumed, whole = read_mp4(root.outbox / "killed.mp4")[0], read_mp4(root.outbox / "whole.mp4")[0]
        assert resumed.shape[0] == 41 and np.array_equal(resumed, whole)
        assert root.stop() == 0
    finally:
        root.cleanup()
