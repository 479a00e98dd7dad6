"""Moving a job's files between inbox/, work/<job-id>/ and failed/<name>/, and writing error.txt.

Only renames (or copy + fsync + unlink across filesystems); it must never delete the only copy of an
input, and must not touch the ledger (the supervisor records what happened).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from daemon.diskspace import removed_on_error
from daemon.faults import kill_point
from daemon.moves import contained, copy_then_remove, discard, fsync_dir

INPUTS_DIR = "inbox"  # work/<id>/inbox/: the job's original files, as they were in the inbox
PREPARED_FILE = "prepared.json"  # work/<id>/prepared.json: what preprocessing produced (the run inputs)
PROGRESS_FILE = "progress.json"  # work/<id>/progress.json: preprocessing progress for `wanbox status`
OUTPUT_FILE = "output.mp4"  # before revision 0006 the one name of a job's video in work/<id>/ (still read back)
OUTPUT_GLOB = "output*.mp4"  # every attempt's video of a job in work/<id>/
ERROR_FILE = "error.txt"
FAILED_POINTER = "failed_dir.txt"  # work/<id>/failed_dir.txt: where a failed job's inputs went


def attempt_output(work_dir: Path, attempt: int, host_id: str) -> Path:
    """work/<id>/output.<attempt>.<host>.mp4: each attempt's video under its own name, so that two hosts (one of
    them frozen past its lease) never write or deliver the same file in the shared work folder."""
    return work_dir / f"output.{attempt}.{re.sub(r'[^A-Za-z0-9._-]', '_', host_id)}.mp4"


@dataclass(frozen=True)
class JobFiles:
    """What belongs to one job in the inbox: the manifest, its inputs, and its folder (folder layout)."""

    inbox: Path
    manifest: Path
    folder: Path | None  # inbox/<name>/ for the folder layout, else None
    inputs: tuple[Path, ...]  # absolute paths of the inputs (top-level layout: siblings of the manifest)

    def base(self) -> Path:
        """The directory that relative input paths start from."""
        return self.folder if self.folder is not None else self.inbox


def move_file(src: Path, dest: Path, op: str | None = None) -> None:
    """Rename `src` to `dest` (never replacing); across filesystems copy to a temporary name, fsync, rename,
    then remove the source (daemon/moves.py: a kill leaves one complete copy, and `settle` finishes it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists: refusing to replace it with {src}")
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_then_remove(src, dest, op)
    fsync_dir(dest.parent)


def copy_file(src: Path, dest: Path) -> None:
    """Copy (hard link when possible) `src` to `dest`: for an input that another job still needs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        with removed_on_error(dest.with_name(f".{dest.name}.copying")) as temp:
            shutil.copy2(src, temp)
            with open(temp, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(temp, dest)


def work_inputs_dir(work: Path, job_id: str) -> Path:
    return work / job_id / INPUTS_DIR


def take_into_work(files: JobFiles, dest: Path, shared: set[Path] = frozenset()) -> None:  # type: ignore[assignment]
    """Move the job's files to `dest` (work/<id>/inbox/): inputs first, the manifest last.

    Inputs in `shared` are still named by another job waiting in the inbox, so they are copied.
    """
    if files.folder is not None:
        move_file(files.folder, dest, "accept")  # one rename takes the folder with everything in it
        kill_point("accept.moved_manifest")
        return
    for src in files.inputs:
        target = dest / src.relative_to(files.inbox)
        if src in shared:
            copy_file(src, target)
        else:
            move_file(src, target, "accept")
        kill_point("accept.moved_input")
    move_file(files.manifest, dest / files.manifest.name, "accept")
    kill_point("accept.moved_manifest")


def return_to_inbox(src_dir: Path, inbox: Path, folder_name: str | None) -> list[Path]:
    """Undo an interrupted (or refused) `take_into_work`: put the files back where they were; what is left of
    `src_dir` once empty goes. Returns what stayed.

    A file whose original name is taken again in the inbox stays where it is (never overwrite), unless it is
    the very file: a copy across filesystems interrupted before its source was removed (or a shared input).
    """
    if folder_name is not None:
        target = inbox / folder_name
        if os.path.lexists(target) and contained(src_dir, target):
            discard(src_dir)  # the inbox still holds the whole folder: our copy is redundant
        elif not os.path.lexists(target):
            move_file(src_dir, target)
        else:
            return [src_dir]
        return []
    stayed = []
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file() or p.is_symlink()):
        target = inbox / path.relative_to(src_dir)
        if os.path.lexists(target) and contained(path, target):
            os.unlink(path)
        elif os.path.lexists(target):
            stayed.append(path)
        else:
            move_file(path, target)
    _remove_empty_dirs(src_dir)
    return stayed


def give_back(taken: Path, inbox: Path, folder_name: str | None) -> None:
    """A take-in that work/ refused (a full disk): what was already taken goes back to the inbox, and the job's
    work folder, empty now, goes."""
    if taken.exists():
        return_to_inbox(taken, inbox, folder_name)
    with contextlib.suppress(OSError):
        taken.parent.rmdir()


def _remove_empty_dirs(root: Path) -> None:
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):  # not empty: something stayed
            os.rmdir(folder)


def free_dir(parent: Path, name: str) -> Path:
    for n in range(1, 10_000):
        candidate = parent / (name if n == 1 else f"{name}-{n}")
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"{parent}: too many entries named {name}")


# `.<name>.<8 hex>.tmp`, or `.<name>.<8 hex>.@<host>.tmp` when written by a host of a shared root: our interrupted writes
TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}(?:\.@([A-Za-z0-9_-]+))?\.tmp$")


def host_tag(host_id: str | None) -> str:
    """The host's mark in its temporary names: `.@<host>` (dots and other signs as `_`), or "" with no host."""
    return "" if host_id is None else ".@" + re.sub(r"[^A-Za-z0-9_-]", "_", host_id)


def temp_name(path: Path) -> Path:
    """The dotfile a write of `path` goes through (outbox tools and our own inbox rules skip dotfiles)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def remove_temps(folder: Path, names: tuple[str, ...] | None = None, host_id: str | None = None) -> list[Path]:
    """Delete the leftovers of our interrupted writes directly in `folder`: `.<name>.<8 hex>.tmp` files, only
    for the final names in `names` when given (a job's own folder may hold anything else of its owner's), and with
    `host_id` only this host's and unmarked ones (a shared outbox holds other live hosts' writes in progress)."""
    gone = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if host_id is not None and match[1] not in (None, host_tag(host_id)[2:]):
            continue
        if names is not None and entry.name.rsplit(".", 2)[0][1:] not in names:
            continue
        os.unlink(entry.path)
        gone.append(Path(entry.path))
    return gone


def write_text_durably(path: Path, text: str) -> None:
    with removed_on_error(temp_name(path)) as temp, open(temp, "x", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def to_failed(failed: Path, name: str, sources: list[tuple[Path, Path]], error_text: str) -> Path:
    """Move (src, relative destination) pairs into a fresh failed/<name>/ and write error.txt there.

    error.txt is written first, so a person who finds the folder always learns why.
    """
    dest = free_dir(failed, name)
    dest.mkdir(parents=True)
    write_text_durably(dest / ERROR_FILE, error_text)
    for src, rel in sources:
        if os.path.lexists(src):
            move_file(src, dest / rel)
    return dest
