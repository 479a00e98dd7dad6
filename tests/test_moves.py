"""daemon/moves.py on a real second filesystem (a tmpfs; needs root, as CI): a move across filesystems leaves
the source or a complete copy, a full disk leaves neither a partial copy nor a lost source, and `settle`
removes a source only when its copy is complete and unchanged.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from daemon import moves
from daemon.jobfiles import move_file
from tests.faults.test_disk_full import fill, mount_tmpfs


@pytest.fixture
def other_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    where = tmp_path / "other"
    mount_tmpfs(where, "1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def job_folder(base: Path) -> Path:
    folder = base / "job"
    (folder / "media").mkdir(parents=True)
    (folder / "job.toml").write_text("schema = 1\n")
    (folder / "media" / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 5000)
    os.symlink("elsewhere", folder / "link")
    return folder


def contents(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def test_a_folder_moved_across_filesystems_arrives_whole_and_its_source_goes(tmp_path: Path, other_fs: Path) -> None:
    src = job_folder(tmp_path)
    before = contents(src)
    move_file(src, other_fs / "job")
    assert contents(other_fs / "job") == before and not src.exists()
    assert not moves.copying_name(other_fs / "job").exists()


def test_a_full_disk_leaves_the_source_and_no_partial_copy(tmp_path: Path, other_fs: Path) -> None:
    src = job_folder(tmp_path)
    before = contents(src)
    fill(other_fs)
    with pytest.raises(OSError) as raised:
        move_file(src, other_fs / "job")
    assert raised.value.errno == errno.ENOSPC  # the errno reaches the caller (shutil.copytree would hide it)
    assert contents(src) == before
    assert sorted(os.listdir(other_fs)) == ["filler.bin"]


def test_settle_removes_a_source_only_beside_its_complete_unchanged_copy(tmp_path: Path, other_fs: Path) -> None:
    src = job_folder(tmp_path)
    moves.copy_then_remove(src, other_fs / "job")
    job_folder(tmp_path)  # the state a kill after the rename leaves: source and copy both there ...
    os.utime(src / "media" / "a.jpg", ns=(0, os.stat(other_fs / "job" / "media" / "a.jpg").st_mtime_ns + 1))
    assert not moves.settle(src, other_fs / "job")  # ... but this source differs from the copy: it stays
    assert src.exists()
    os.utime(src / "media" / "a.jpg", ns=(0, os.stat(other_fs / "job" / "media" / "a.jpg").st_mtime_ns))
    os.utime(src / "job.toml", ns=(0, os.stat(other_fs / "job" / "job.toml").st_mtime_ns))
    (other_fs / "job" / "error.txt").write_text("why")  # the destination may hold more than the source
    moves.copying_name(other_fs / "job").mkdir()  # and an earlier try's temporary copy
    assert moves.settle(src, other_fs / "job")
    assert not src.exists() and not moves.copying_name(other_fs / "job").exists()
    assert (other_fs / "job" / "media" / "a.jpg").stat().st_size == 5002
