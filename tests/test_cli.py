"""The `wanbox` CLI: submit (safe copy into the inbox), read commands, cancel/retry, exit codes.

Runs `daemon.cli.main` in-process against real roots and a real ledger file; one console-script run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main, render_status
from daemon.ledger import Ledger
from daemon.states import JobState
from daemon.watcher import scan_inbox
from tests.jobs import resolved_job
from tests.workers.harness import REPO, manifest_text, write_image

S = JobState


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("inbox", "outbox", "failed", "work", "state"):
        (tmp_path / "root" / name).mkdir(parents=True)
    return tmp_path / "root"


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_image(src / "media" / "cat.jpg")
    (src / "cat.toml").write_text(manifest_text(image='"media/cat.jpg"'))
    return src


def test_submit_copies_media_first_and_the_manifest_last(root: Path, upload: Path, capsys) -> None:
    assert main(["submit", str(upload / "cat.toml"), "--root", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.index("media/cat.jpg") < out.index("submitted")
    assert (root / "inbox" / "media" / "cat.jpg").read_bytes() == (upload / "media" / "cat.jpg").read_bytes()
    assert (root / "inbox" / "cat.toml").read_text() == (upload / "cat.toml").read_text()
    assert [c.key for c in scan_inbox(root / "inbox")] == ["cat.toml"]
    assert not [p for p in (root / "inbox").rglob(".*")]  # no temporary files left behind
    # the same again: the job name is taken -> a clear error, nothing overwritten
    assert main(["submit", str(upload / "cat.toml"), "--root", str(root)]) == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err
    assert main(["submit", str(upload / "cat.toml"), "--root", str(root), "--name", "cat2"]) == EXIT_OK
    assert "already in the inbox with the same content" in capsys.readouterr().out


def test_submit_folder_appears_at_once_and_refuses_conflicts(root: Path, upload: Path, tmp_path: Path,
                                                             capsys) -> None:
    folder = tmp_path / "dance"
    write_image(folder / "cat.jpg")
    (folder / "job.toml").write_text(manifest_text())
    assert main(["submit", str(folder), "--root", str(root)]) == EXIT_OK
    assert sorted(os.listdir(root / "inbox" / "dance")) == ["cat.jpg", "job.toml"]
    assert sorted(os.listdir(root / "inbox")) == ["dance"]
    write_image(root / "inbox" / "media" / "cat.jpg", color=(1, 2, 3))  # someone else's different file
    assert main(["submit", str(upload / "cat.toml"), "--root", str(root)]) == EXIT_USAGE
    assert "already exists with other content" in capsys.readouterr().err
    assert not (root / "inbox" / "cat.toml").exists()


def test_submit_rejects_invalid_manifests_and_missing_media(root: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(manifest_text(frames=80))
    assert main(["submit", str(bad), "--root", str(root)]) == EXIT_USAGE
    assert "video.frames" in capsys.readouterr().err
    (tmp_path / "nomedia.toml").write_text(manifest_text(image='"gone.jpg"'))
    assert main(["submit", str(tmp_path / "nomedia.toml"), "--root", str(root)]) == EXIT_USAGE
    assert "inputs.image = 'gone.jpg': no such file" in capsys.readouterr().err
    assert os.listdir(root / "inbox") == []


def make_jobs(root: Path) -> dict[str, str]:
    with Ledger.open(root / "state" / "wanbox.db") as ledger:
        staged = ledger.add_staged("waiting", "i2v", root / "inbox" / "waiting.toml", None)
        running = ledger.add_staged("running", "i2v", root / "inbox" / "running.toml", None)
        ledger.transition(running.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(root / "work" / "x"),
                          params_json=resolved_job(name="running", steps=4, seed=3).to_dict())
        ledger.transition(running.id, S.QUEUED, S.PREPROCESSING, "prep")
        ledger.transition(running.id, S.PREPROCESSING, S.READY, "prepared")
        ledger.transition(running.id, S.READY, S.SAMPLING, "sent")
        ledger.record_progress(running.id, "sampling", 2, 4)
        rejected = ledger.add_staged("broken", "i2v", root / "inbox" / "broken.toml", None)
        ledger.transition(rejected.id, S.STAGED, S.REJECTED, "rejected: video.frames = 80",
                          last_error="video.frames = 80: expected 4n+1", error_kind="input")
        return {"waiting": staged.id, "running": running.id, "broken": rejected.id}


def test_status_show_and_json(root: Path, capsys) -> None:
    ids = make_jobs(root)
    assert main(["status", "--root", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "running" in out and "[##########..........] 2/4" in out and "video.frames = 80" in out
    assert "sampling: 1" in out and "staged: 1" in out and "rejected: 1" in out
    assert main(["status", "--json", "--root", str(root)]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["sampling"] == 1 and {j["name"] for j in data["jobs"]} == set(ids)
    others = [i for i in ids.values() if i != ids["running"]]
    prefix = next(ids["running"][:n] for n in range(8, 21) if not any(o.startswith(ids["running"][:n]) for o in others))
    assert main(["show", prefix, "--root", str(root)]) == EXIT_OK  # a unique prefix is enough
    out = capsys.readouterr().out
    assert "state: sampling" in out and "steps 4, seed 3" in out
    assert out.count("->") == 5  # staged, queued, preprocessing, ready, sampling
    assert main(["show", ids["broken"], "--json", "--root", str(root)]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "rejected" and shown["events"][-1]["message"].startswith("rejected")


def test_cancel_retry_and_exit_codes(root: Path, capsys) -> None:
    ids = make_jobs(root)
    assert main(["cancel", ids["running"], "--root", str(root)]) == EXIT_OK
    assert "stops it at the next step" in capsys.readouterr().out
    assert main(["cancel", ids["running"], "--root", str(root)]) == EXIT_FAILURE  # already ended
    assert "already ended" in capsys.readouterr().err
    assert main(["retry", ids["running"], "--root", str(root)]) == EXIT_OK
    assert main(["retry", ids["broken"], "--root", str(root)]) == EXIT_FAILURE  # rejected: resubmit instead
    assert main(["show", "nope", "--root", str(root)]) == EXIT_NOT_FOUND
    assert main(["cancel", "2026", "--root", str(root)]) == EXIT_NOT_FOUND  # ambiguous prefix
    capsys.readouterr()
    with Ledger.open(root / "state" / "wanbox.db") as ledger:
        assert ledger.get(ids["running"]).state == S.QUEUED


def test_missing_ledger_bad_config_and_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["status", "--root", str(tmp_path / "empty")]) == EXIT_NOT_FOUND
    assert "has `wanbox serve` run" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("[inbox]\nsettle = 1\n")
    assert main(["status", "--config", str(tmp_path / "c.toml")]) == EXIT_CONFIG
    assert "did you mean 'settle_seconds'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["models", "pull", "--root", str(tmp_path)])
    assert info.value.code == EXIT_USAGE


def test_validate_is_the_schema_validator(tmp_path: Path, capsys) -> None:
    write_image(tmp_path / "cat.jpg")
    (tmp_path / "ok.toml").write_text(manifest_text())
    (tmp_path / "bad.toml").write_text(manifest_text(frames=80))
    assert main(["validate", str(tmp_path / "ok.toml")]) == EXIT_OK
    assert "i2v-A14B" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "bad.toml")]) == EXIT_USAGE
    assert "video.frames = 80: expected 4n+1" in capsys.readouterr().err


def test_doctor_reports_each_check(root: Path, capsys) -> None:
    code = main(["doctor", "--json", "--root", str(root)])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["inbox dir"]["status"] == "ok" and checks["free disk"]["status"] in ("ok", "warn")
    assert "model i2v-A14B" in checks and "worker command" in checks and "GPUs" in checks
    assert code == (EXIT_FAILURE if any(c["status"] == "fail" for c in checks.values()) else EXIT_OK)


def test_render_status_of_an_empty_ledger() -> None:
    assert render_status([], {}).splitlines()[0].startswith("JOB")


def test_console_entry_point_runs_as_a_module(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "--help"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0
    for command in ("serve", "submit", "status", "show", "cancel", "retry", "validate", "doctor", "models",
                    "preprocess", "demo"):
        assert command in result.stdout
    assert "exit codes" in result.stdout


def test_models_and_preprocess_are_delegated_with_the_configured_dirs(root: Path, tmp_path: Path,
                                                                       capsys) -> None:
    assert main(["models", "list", "--root", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"{root / 'models' / 'Wan2.2-I2V-A14B'}" in out and "not installed" in out
    assert main(["models", "verify", "animate-14B", "--root", str(root)]) == EXIT_FAILURE
    assert "animate-14B" in capsys.readouterr().out
    write_image(tmp_path / "hero.png")
    code = main(["preprocess", "--root", str(root), "--mode", "animation", "--video", str(tmp_path / "none.mp4"),
                 "--character", str(tmp_path / "hero.png"), "--out", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    assert str(root / "models" / "mediapipe") in capsys.readouterr().err  # looked where the config says


def test_delegated_commands_receive_their_own_leading_options(capsys) -> None:
    # `wanbox demo --cache-dir X` and `wanbox validate --json-schema`: the options belong to the delegate.
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--cache-dir" in capsys.readouterr().out
    assert main(["validate", "--json-schema"]) == EXIT_OK
    assert '"$schema"' in capsys.readouterr().out


def test_models_pull_animate_reports_unreachable_mediapipe_files(tmp_path: Path, monkeypatch, capsys) -> None:
    # The download location is the one thing replaced here (no network in tests): the error must say which
    # file and where, and the command must fail rather than report success.
    from daemon import cli
    from pipeline.preprocess.animate import models
    from pipeline.preprocess.animate.errors import ModelsMissingError

    def unreachable(dest: Path, **_: object) -> list[Path]:
        raise ModelsMissingError("face_landmarker.task", "https://example.invalid", "a reachable download location",
                                 "name resolution failed")

    monkeypatch.setattr(models, "fetch_models", unreachable)
    assert cli._pull_mediapipe(tmp_path / "mediapipe") == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "face_landmarker.task" in err and str(tmp_path / "mediapipe") in err


def test_status_stays_light(root: Path) -> None:
    """A quick command pays for neither OpenCV and the animate code nor Alembic on an up-to-date ledger."""
    Ledger.open(root / "state" / "wanbox.db").close()
    probe = ("import sys; from daemon.cli import main; code = main(['status', '--root', sys.argv[1]]); "
             "print(code, sorted(m for m in ('cv2', 'alembic', 'torch') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe, str(root)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr
