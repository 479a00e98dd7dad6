"""Delivery to the outbox: decodable mp4 + poster + sidecar, atomic names, never overwriting.

Real H.264 files written with PyAV and decoded back; a watcher thread looks at the outbox while it is written.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from daemon.jobfiles import remove_temps
from daemon.outbox import Outbox, OutputInvalid, _temp_name, probe_video
from tests.workers.fake_pool_worker import write_mp4


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("v") / "out.mp4"
    write_mp4(path, frames=9, width=48, height=32, fps=16)
    return path


def test_probe_decodes_every_frame(video: Path) -> None:
    info = probe_video(video)
    assert (info.frames, info.width, info.height) == (9, 48, 32)
    assert info.fps == pytest.approx(16)


def test_truncated_or_garbage_video_is_refused(tmp_path: Path, video: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(OutputInvalid):
        probe_video(bad)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    with pytest.raises(OutputInvalid):
        probe_video(cut)
    outbox = Outbox(tmp_path / "outbox")
    with pytest.raises(OutputInvalid):
        outbox.deliver(bad, "x", {})
    assert not (tmp_path / "outbox").exists() or list((tmp_path / "outbox").iterdir()) == []


def test_deliver_writes_video_poster_and_sidecar_and_never_overwrites(tmp_path: Path, video: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "cat.json").write_text("someone else's file")  # takes the base name "cat"
    first = outbox.deliver(video, "cat", {"job_id": "J1", "seed": 7})
    second = outbox.deliver(video, "cat", {"job_id": "J2"})
    assert first["video"].endswith("cat-2.mp4") and second["video"].endswith("cat-3.mp4")
    assert (tmp_path / "outbox" / "cat.json").read_text() == "someone else's file"
    sidecar = json.loads(Path(first["sidecar"]).read_text())
    assert sidecar["job_id"] == "J1" and sidecar["seed"] == 7
    assert sidecar["video"] == {"frames": 9, "width": 48, "height": 32, "fps": pytest.approx(16)}
    assert sidecar["outputs"] == first
    with Image.open(first["poster"]) as poster:
        assert poster.size == (48, 32) and poster.format == "JPEG"
    assert probe_video(Path(first["video"])).frames == 9
    assert video.exists()  # the source is copied, not taken
    leftovers = [p.name for p in (tmp_path / "outbox").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_the_outbox_never_shows_a_partial_file(tmp_path: Path) -> None:
    big = tmp_path / "big.mp4"
    write_mp4(big, frames=60, width=320, height=240, fps=16)
    outbox_dir = tmp_path / "outbox"
    outbox_dir.mkdir()
    checked: dict[str, str] = {}
    done = threading.Event()

    def check(name: str) -> str:
        path = outbox_dir / name
        if name.endswith(".mp4"):
            return f"{probe_video(path).frames} frames"
        if name.endswith(".json"):
            return json.loads(path.read_text())["job_id"]
        with Image.open(path) as im:
            im.load()
            return f"{im.size}"

    def sweep() -> None:
        for name in os.listdir(outbox_dir):
            if not name.startswith(".") and name not in checked:
                try:
                    checked[name] = check(name)  # the moment a final name appears it must be complete
                except Exception as exc:  # recorded, then asserted below
                    checked[name] = f"PARTIAL: {exc!r}"

    def watch() -> None:
        while not done.is_set():
            sweep()

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        outbox = Outbox(outbox_dir)
        for i in range(3):
            outbox.deliver(big, "clip", {"job_id": f"J{i}"})
    finally:
        done.set()
        thread.join()
    seen_while_writing = len(checked)
    sweep()
    assert seen_while_writing >= 3, checked  # the watcher really looked during the deliveries
    assert len(checked) == 9, checked
    assert not [v for v in checked.values() if v.startswith("PARTIAL")], checked
    assert checked["clip.mp4"] == "60 frames" and checked["clip-3.json"] == "J2"


def test_publishing_never_replaces_an_existing_file(tmp_path: Path) -> None:
    from daemon.outbox import link_without_replacing

    (tmp_path / "final").write_text("theirs")
    (tmp_path / ".temp").write_text("ours")
    with pytest.raises(FileExistsError):
        link_without_replacing(tmp_path / ".temp", tmp_path / "final")
    assert (tmp_path / "final").read_text() == "theirs" and (tmp_path / ".temp").exists()
    link_without_replacing(tmp_path / ".temp", tmp_path / "new")
    assert (tmp_path / "new").read_text() == "ours" and not (tmp_path / ".temp").exists()


def test_extras_are_delivered_under_the_same_free_name_before_the_sidecar(tmp_path: Path) -> None:
    import torch

    from pipeline.video import probe
    from pipeline.video import write_mp4 as write_frames

    frames = torch.rand(3, 5, 32, 48) * 2 - 1
    video, preview = write_frames(frames, tmp_path / "v.mp4", 16), write_frames(frames, tmp_path / "p.mp4", 16)
    outbox = Outbox(tmp_path / "outbox", True)
    first = outbox.deliver(video, "job", {"k": 1}, {"preview": preview})
    second = outbox.deliver(video, "job", {"k": 2}, {"preview": preview})
    assert first["preview"].endswith("job.preview.mp4") and second["preview"].endswith("job-2.preview.mp4")
    assert probe(Path(second["preview"]))[0] == 5
    # a name taken only by an extra is not reused either: the whole set moves on to the next free base
    (tmp_path / "outbox" / "next.preview.mp4").write_bytes(b"x")
    assert outbox.deliver(video, "next", {}, {"preview": preview})["video"].endswith("next-2.mp4")


def test_start_up_removes_only_this_hosts_leftovers_in_a_shared_outbox(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    mine, theirs = _temp_name(outbox, "cat.mp4", ".@host-a"), _temp_name(outbox, "cat.mp4", ".@host-b")
    legacy = _temp_name(outbox, "dog.mp4")  # written before hosts marked their temporary files
    for path in (mine, theirs, legacy):
        path.write_bytes(b"x")
    assert sorted(remove_temps(outbox, host_id="host-a")) == sorted([mine, legacy])
    assert theirs.exists()  # host-b may be writing it right now
