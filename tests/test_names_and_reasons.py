"""What a person types and reads: jobs picked by name, one attempt count, where the manifest is now, input errors
that name the file as uploaded and say what to do, and `wanbox validate` decoding the media that is there.

A real ledger file, the real CLI in-process, real image and video files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from daemon.cli import EXIT_NOT_FOUND, EXIT_OK, main
from daemon.failures import failed_text
from daemon.ledger import Ledger
from daemon.states import ErrorKind, JobState
from inbox_schema.cli import main as validate_main
from pipeline.video import write_mp4
from tests.jobs import resolved_job
from tests.workers.harness import manifest_text, write_image

S = JobState


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("inbox", "outbox", "failed", "work", "state"):
        (tmp_path / "root" / name).mkdir(parents=True)
    return tmp_path / "root"


def accepted(ledger: Ledger, root: Path, name: str) -> str:
    row = ledger.add_staged(name, "i2v", root / "inbox" / f"{name}.toml", None)
    taken = root / "work" / row.id / "inbox"
    write_image(taken / "cat.jpg")
    (taken / f"{name}.toml").write_text(manifest_text())
    ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(taken.parent),
                      params_json=resolved_job(name=name).to_dict())
    return row.id


def test_show_cancel_and_retry_take_a_jobs_name(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Ledger.open(root / "state" / "wanbox.db") as ledger:
        older = accepted(ledger, root, "cp-b")
        newer = accepted(ledger, root, "cp-b")
        other = accepted(ledger, root, "cp-c")
    assert main(["show", "cp-b", "--root", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"job {newer}  cp-b") and f"also named so: {older} (queued)" in out
    assert main(["cancel", "cp-c", "--root", str(root)]) == EXIT_OK
    assert f"cancelled {other} (cp-c)" in capsys.readouterr().out
    assert main(["retry", "cp-c", "--root", str(root)]) == EXIT_OK
    assert f"{other} (cp-c) is queued again" in capsys.readouterr().out
    assert main(["show", "cp-z", "--root", str(root)]) == EXIT_NOT_FOUND
    assert "no job of that name" in capsys.readouterr().err


def test_one_attempt_count_and_the_manifests_place_now(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Ledger.open(root / "state" / "wanbox.db") as ledger:
        job_id = accepted(ledger, root, "cat")
        for frm, to in ((S.QUEUED, S.PREPROCESSING), (S.PREPROCESSING, S.READY), (S.READY, S.SAMPLING)):
            ledger.transition(job_id, frm, to, "on")
        assert ledger.record_failure(job_id, S.SAMPLING, "pool died", ErrorKind.POOL, True) == S.READY
        assert ledger.get(job_id).attempts_made == 1  # one attempt failed, none running
        ledger.transition(job_id, S.READY, S.SAMPLING, "again", retry_after=None)
        assert ledger.get(job_id).attempts_made == 2  # the second one is running
        ledger.transition(job_id, S.SAMPLING, S.FINALIZING, "done")
        ledger.transition(job_id, S.FINALIZING, S.DONE, "delivered")
        assert ledger.get(job_id).attempts_made == 2
    assert main(["show", job_id, "--root", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "attempts: 2 of 3" in out
    assert f"manifest: {root / 'work' / job_id / 'inbox' / 'cat.toml'} (uploaded as {root / 'inbox' / 'cat.toml'})" in out
    assert main(["status", "--json", "--root", str(root)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["jobs"][0]["attempts"] == 2


def test_an_input_error_names_the_uploaded_file_and_says_to_upload_it_again() -> None:
    text = failed_text("J1", "cat", "inputs.image: image file 'cat.jpg': cannot be decoded", ErrorKind.INPUT)
    assert "upload a corrected file" in text and "wanbox retry J1" in text
    assert "after fixing the installation" not in text
    assert "after fixing the installation" in failed_text("J1", "cat", "the pool died", ErrorKind.POOL)


def test_validate_decodes_the_images_and_probes_the_videos_that_are_there(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    (tmp_path / "cat.toml").write_text(manifest_text(image='"cut.jpg"'))
    assert validate_main([str(tmp_path / "cat.toml")]) == 2
    err = capsys.readouterr().err
    assert "inputs.image: image file 'cut.jpg': cannot be decoded" in err and "upload a complete file" in err
    write_image(tmp_path / "good.jpg")
    (tmp_path / "cat.toml").write_text(manifest_text(image='"good.jpg"'))
    assert validate_main([str(tmp_path / "cat.toml")]) == 0
    animate = ('schema = 1\nkind = "animate"\n[inputs]\ncharacter = "good.jpg"\nvideo = "dance.mp4"\n')
    (tmp_path / "dance.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (tmp_path / "anim.toml").write_text(animate)
    assert validate_main([str(tmp_path / "anim.toml")]) == 2
    assert "inputs.video: video file 'dance.mp4': expected a readable video file" in capsys.readouterr().err
    import torch

    write_mp4(torch.zeros(3, 5, 32, 32), tmp_path / "dance.mp4", fps=8)
    assert validate_main([str(tmp_path / "anim.toml")]) == 0
