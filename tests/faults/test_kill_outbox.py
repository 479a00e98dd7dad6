"""The outbox side of exactly once, on real H.264 files: `Outbox.complete` is safe to call again after a crash
at any point (it writes only what is missing and verifies the rest), refuses a name held by another job's file,
and a video is checked against the job (frames, size, fps) before anything is delivered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.delivery import Delivery
from daemon.jobfiles import remove_temps
from daemon.ledger import JobRecord, Ledger
from daemon.ledger.intents import Intents
from daemon.outbox import NameTaken, Outbox, OutputInvalid, check_output, probe_video
from daemon.states import JobState, shortest_path
from tests.jobs import resolved_job
from tests.workers.fake_pool_worker import write_mp4


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("v") / "out.mp4"
    write_mp4(path, frames=5, width=48, height=32, fps=16)
    return path


def test_complete_again_after_a_partial_delivery_writes_only_what_is_missing(tmp_path: Path, video: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    first = outbox.complete(video, "cat", {"job_id": "J1"})
    made = {name: (tmp_path / "outbox" / name).stat().st_ino for name in os.listdir(tmp_path / "outbox")}
    assert sorted(made) == ["cat.jpg", "cat.json", "cat.mp4"]
    # As a crash after the video leaves it: the poster and sidecar gone, a temp file of the interrupted write.
    (tmp_path / "outbox" / "cat.jpg").unlink()
    (tmp_path / "outbox" / "cat.json").unlink()
    (tmp_path / "outbox" / ".cat.jpg.0123abcd.tmp").write_bytes(b"half a poster")
    assert remove_temps(tmp_path / "outbox") == [tmp_path / "outbox" / ".cat.jpg.0123abcd.tmp"]
    again = outbox.complete(video, "cat", {"job_id": "J1"})
    assert again == first
    assert sorted(os.listdir(tmp_path / "outbox")) == ["cat.jpg", "cat.json", "cat.mp4"]
    assert (tmp_path / "outbox" / "cat.mp4").stat().st_ino == made["cat.mp4"]  # verified, not written again
    assert json.loads((tmp_path / "outbox" / "cat.json").read_text())["job_id"] == "J1"
    assert outbox.complete(video, "cat", {"job_id": "J1"}) == first  # and once more: nothing changes


def test_a_name_held_by_another_jobs_file_is_refused(tmp_path: Path, video: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.complete(video, "cat", {"job_id": "J1"})
    with pytest.raises(NameTaken):
        outbox.complete(video, "cat", {"job_id": "J2"})  # same bytes, but the sidecar is J1's
    (tmp_path / "outbox" / "dog.mp4").write_bytes(b"someone else's video")
    with pytest.raises(NameTaken):
        outbox.complete(video, "dog", {"job_id": "J3"})
    assert (tmp_path / "outbox" / "dog.mp4").read_bytes() == b"someone else's video"  # never replaced
    assert outbox.free_name("dog") == "dog-2" and outbox.free_name("cat") == "cat-2"


def test_the_video_must_be_what_the_job_asked_for(video: Path, tmp_path: Path) -> None:
    info = probe_video(video)
    job = resolved_job(frames=5, fps=16)
    check_output(info, job, {"frames": 5, "width": 48, "height": 32, "fps": 16})
    with pytest.raises(OutputInvalid, match=r"5 frames decoded, the job asks for 9 \(video.frames\)"):
        check_output(info, resolved_job(frames=9), {})
    with pytest.raises(OutputInvalid, match=r"size 48x32 decoded, the worker reported 64x48"):
        check_output(info, job, {"width": 64, "height": 48})
    with pytest.raises(OutputInvalid, match=r"16 fps decoded, expected 24 \(video.fps\)"):
        check_output(info, resolved_job(fps=24), {})
    big = tmp_path / "big.mp4"
    write_mp4(big, frames=5, width=640, height=640, fps=16)
    with pytest.raises(OutputInvalid, match=r"size 640x640 decoded, larger than the job's 832\*480"):
        check_output(probe_video(big), job, {})


def test_a_video_sampled_again_replaces_its_own_unfinished_delivery(tmp_path: Path, ledger_url: str) -> None:
    """An interrupted delivery whose video is gone is sampled again; on a GPU the new video may differ in its
    bytes: the first one's files under the job's name are withdrawn, never left beside a `-2`."""
    first, second = tmp_path / "first.mp4", tmp_path / "second.mp4"
    write_mp4(first, frames=5, width=48, height=32, fps=16)
    write_mp4(second, frames=5, width=64, height=48, fps=16)
    with Ledger.open(ledger_url) as ledger:
        record = finalizing(ledger, tmp_path)
        job = record
        delivery = Delivery(ledger, Outbox(tmp_path / "outbox"))
        plan = delivery.plan(record, first, {"job_id": job.id}, {})
        delivery.complete(record, first, plan)
        (tmp_path / "outbox" / "cat.json").unlink()  # as a crash before the sidecar leaves it
        (tmp_path / "outbox" / "other.mp4").write_bytes(b"not ours")
        again = delivery.plan(record, second, {"job_id": job.id}, {})
        assert again["base"] == "cat" and sorted(os.listdir(tmp_path / "outbox")) == ["other.mp4"]
        outputs = delivery.complete(record, second, again)
        assert outputs["video"].endswith("/cat.mp4") and probe_video(Path(outputs["video"])).width == 64
        assert sorted(os.listdir(tmp_path / "outbox")) == ["cat.jpg", "cat.json", "cat.mp4", "other.mp4"]


def finalizing(ledger: Ledger, tmp_path: Path) -> JobRecord:
    job = ledger.add_staged("cat", "i2v", "inbox/cat.toml", None, params_json=resolved_job(name="cat").to_dict())
    state = JobState.STAGED
    for nxt in shortest_path(JobState.STAGED, JobState.FINALIZING):
        assert ledger.transition(job.id, state, nxt, "on its way", work_dir=str(tmp_path / "work"))
        state = nxt
    return ledger.get(job.id)


def test_a_delivery_that_failed_part_way_is_withdrawn_whole(tmp_path: Path, video: Path, ledger_url: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        record = finalizing(ledger, tmp_path)
        delivery = Delivery(ledger, Outbox(tmp_path / "outbox"))
        delivery.complete(record, video, delivery.plan(record, video, {"job_id": record.id}, {}))
        (tmp_path / "outbox" / "cat.json").unlink()  # as a write that failed before the sidecar leaves it
        delivery.withdraw(record)
        assert os.listdir(tmp_path / "outbox") == [] and Intents(ledger).get(record.id) is None
