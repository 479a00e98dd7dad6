"""Moving a file or folder onto another filesystem so that a kill at any moment leaves the source, or the
complete destination (perhaps with the source still beside it), never a torn copy: copy under a temporary name
beside the destination, fsync, rename into place, and only then remove the source.

`settle` is the recovery half: the destination's final name exists only once the copy was complete, so a
source still there next to it is removed (when every file of it is in the destination, unchanged), and a
temporary copy is thrown away. It must never remove a source whose copy is not complete and identical.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from daemon.faults import kill_point

COPYING_SUFFIX = ".copying"  # `.<name>.copying`: a copy in progress (dotfiles are skipped by the inbox rules)


def fsync_dir(path: Path) -> None:
    """Make a rename or link in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copying_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{COPYING_SUFFIX}")


def discard(path: Path) -> None:
    """Remove a file, link or folder of ours (a temporary copy, a redundant source) if it is there."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _sync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root` (links and special files have no data of their own)."""
    if not os.path.isdir(root) or os.path.islink(root):
        with open(root, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(folder))


def _copy_tree(src: Path, dest: Path) -> None:
    """shutil.copytree with links kept as links, but raising the first OSError as it is (copytree gathers them
    into a shutil.Error without an errno, which would hide a full disk)."""
    os.mkdir(dest)
    for entry in os.scandir(src):
        target = dest / entry.name
        if entry.is_dir(follow_symlinks=False):
            _copy_tree(Path(entry.path), target)
        else:
            shutil.copy2(entry.path, target, follow_symlinks=False)
    shutil.copystat(src, dest)


def copy_then_remove(src: Path, dest: Path, op: str | None = None) -> None:
    """The cross-filesystem move: a partial copy (a full disk, above all) is removed before the error goes on.
    `op` names the operation ("accept", "reject", "fail") whose kill points are reached on the way."""
    temp = copying_name(dest)
    discard(temp)  # an earlier try's leftover
    try:
        if src.is_dir() and not src.is_symlink():
            _copy_tree(src, temp)
        else:
            shutil.copy2(src, temp, follow_symlinks=False)
        if not os.path.islink(temp):
            _sync_tree(temp)
    except BaseException:
        discard(temp)
        raise
    if op:
        kill_point(f"{op}.copied")
    os.rename(temp, dest)
    fsync_dir(dest.parent)
    if op:
        kill_point(f"{op}.copy_placed")
    discard(src)
    fsync_dir(src.parent)


def _same_file(a: str, b: str) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    if stat.S_ISLNK(sa.st_mode) or stat.S_ISLNK(sb.st_mode):
        return stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode) and os.readlink(a) == os.readlink(b)
    # copy2 keeps the mtime to the nanosecond: an upload replaced since then differs in it or in its size
    return stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode) and (sa.st_size, sa.st_mtime_ns) == (
        sb.st_size, sb.st_mtime_ns)


def contained(src: Path, dest: Path) -> bool:
    """Whether every file under `src` is in `dest` unchanged (dest may hold more, e.g. our error.txt)."""
    try:
        if not (os.path.isdir(src) and not os.path.islink(src)):
            return _same_file(str(src), str(dest))
        if not os.path.isdir(dest):
            return False
        for folder, dirs, files in os.walk(src):
            rel = os.path.relpath(folder, src)
            for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                if not _same_file(os.path.join(folder, name), os.path.join(dest, rel, name)):
                    return False
    except OSError:
        return False
    return True


def settle(src: Path, dest: Path) -> bool:
    """Finish a move from `src` to `dest` that a kill interrupted: the temporary copy goes; a source left beside
    its complete copy goes. True when the move is (now) done, i.e. `dest` exists and `src` does not."""
    discard(copying_name(dest))
    if os.path.lexists(src) and os.path.lexists(dest) and contained(src, dest):
        discard(src)
        fsync_dir(src.parent)
    return os.path.lexists(dest) and not os.path.lexists(src)


def remove_copying(root: Path) -> list[Path]:
    """Every `.<name>.copying` under `root` (a folder that is all ours, e.g. work/<id>/): interrupted copies."""
    gone = []
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            if name.startswith(".") and name.endswith(COPYING_SUFFIX):
                discard(Path(folder) / name)
                gone.append(Path(folder) / name)
        dirs[:] = [d for d in dirs if not d.endswith(COPYING_SUFFIX)]
    return gone
