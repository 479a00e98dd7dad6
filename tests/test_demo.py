"""`wanbox demo` end to end: tiny model, throwaway root, real supervisor, real CPU torchrun pool, real mp4.

Slow by nature (a whole daemon run); kept small with few frames and steps.
"""

from __future__ import annotations

import json

import pytest

from daemon import demo
from daemon.ledger import Ledger
from pipeline.video import probe


@pytest.mark.slow
def test_demo_delivers_a_video_from_the_real_photo(tmp_path, capfd) -> None:
    root = tmp_path / "root"
    code = demo.main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--root",
            str(root),
            "--frames",
            "5",
            "--steps",
            "2",
            "--timeout",
            "240",
        ]
    )
    out = capfd.readouterr().out
    assert code == 0, out
    video = root / "outbox" / f"{demo.JOB_NAME}.mp4"
    assert f"output {video}" in out
    frames, width, height, fps = probe(video)
    assert (frames, fps) == (5, 16.0)
    assert width * height <= demo.DEMO_MAX_AREA and width % 16 == 0 and height % 16 == 0
    assert height > width, "the portrait photo's aspect is kept"
    sidecar = json.loads((root / "outbox" / f"{demo.JOB_NAME}.json").read_text())
    assert sidecar["video"] == {"frames": 5, "width": width, "height": height, "fps": 16.0}
    assert sidecar["parameters"]["sampling"]["steps"] == 2
    assert not any((root / "inbox").iterdir()), "the inbox only holds work not yet taken"
    ledger = Ledger.open(root / "state" / "wanbox.db")
    try:
        (job,) = ledger.list()
        assert (str(job.state), job.phase, job.step) == ("done", "write", 1), "worker progress reached the ledger"
    finally:
        ledger.close()
    # the tiny model is cached: a second run does not rebuild it
    assert (tmp_path / "cache" / "demo-tiny-i2v" / "high_noise_model" / "config.json").is_file()


def test_demo_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--nproc", "3"])


def test_the_demo_config_caps_the_area_and_threads_by_settings_not_a_copied_command(tmp_path) -> None:
    from daemon.config import DEFAULT_WORKER_COMMAND
    from daemon.pool import WarmPool

    cfg = demo.demo_config(tmp_path, tmp_path / "ckpt", 1)
    assert cfg.pool.command == DEFAULT_WORKER_COMMAND
    pool = WarmPool(cfg.pool, cfg.paths.socket)
    assert pool.command("i2v-A14B")[-2:] == ["--max-area", str(demo.DEMO_MAX_AREA)]
    assert pool.environment()["OMP_NUM_THREADS"] == "1"
