"""Rules for file names in the inbox: which names are temporary, and where an input path may point.

Input paths are checked by their text and by lstat only: a symlink's target is never read or
opened. It must not hash, move or wait for files (that is the watcher's job).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

# Partial uploads and editor/OS leftovers: rsync's `.name.XXXXXX`, WinSCP's `*.filepart`, browsers'
# `*.crdownload`, editors' `*~`, and desktop clutter. The daemon never touches these.
TEMPORARY_SUFFIXES = (".part", ".partial", ".filepart", ".tmp", ".crdownload", ".swp", "~")
OS_CLUTTER = frozenset({"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "lost+found"})

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_temporary_name(name: str) -> bool:
    """True for names still being written or never meant as input (dotfiles, *.part, *.tmp, *~ ...)."""
    lowered = name.lower()
    return name.startswith(".") or lowered.endswith(TEMPORARY_SUFFIXES) or lowered in OS_CLUTTER


def relpath_problem(relpath: str) -> str | None:
    """Why a path as written cannot name an input (finishes "expected ..."), or None when it can."""
    plain = 'a path relative to the manifest, with "/" between folders, e.g. "cat.jpg" or "media/cat.jpg"'
    if not relpath.strip():
        return plain + ", not an empty string"
    if _CONTROL.search(relpath):
        return plain + ", without control characters"
    if "\\" in relpath or _DRIVE.match(relpath):
        return plain + ' (no backslashes or drive letters: write "media/cat.jpg")'
    if relpath.startswith(("/", "~")):
        return plain + ", not an absolute path: inputs must be inside the inbox"
    parts = PurePosixPath(relpath).parts
    if ".." in parts:
        return plain + ', without ".." (inputs must be inside the inbox, beside or below the manifest)'
    temporary = [part for part in parts if is_temporary_name(part)]
    if temporary:
        return (plain + f'; "{temporary[0]}" is a temporary or hidden name (dotfile, .part, .tmp, ~),'
                " which the daemon never reads: rename the file when its upload is complete")
    return None


def relative_base(base_dir: Path, inbox_root: Path) -> PurePosixPath | None:
    """Where the manifest's folder is below the inbox root, or None when it is not inside it."""
    base_abs, root_abs = Path(os.path.abspath(base_dir)), Path(os.path.abspath(inbox_root))
    for base, root in ((base_abs, root_abs), (base_abs.resolve(), root_abs.resolve())):
        try:
            return PurePosixPath(base.relative_to(root).as_posix())
        except ValueError:
            continue
    return None


def on_disk_problem(root: Path, parts: tuple[str, ...]) -> str | None:
    """Walk from the inbox root to the input with lstat: reject symlinks and non-regular files.

    All symlinks are rejected, even ones pointing inside the inbox: an accepted job's files are
    renamed into work/<job-id>/, where a relative link would dangle and an absolute one would point
    back into the inbox. A missing component is not a problem here (the upload may still come).
    """
    current = root
    for index, part in enumerate(parts):
        current = current / part
        shown = "/".join(parts[: index + 1])
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. a name longer than the filesystem allows (ENAMETOOLONG)
            return f'a path this filesystem can hold, but "{shown[:80]}" cannot be looked up ({exc.strerror})'
        if stat.S_ISLNK(info.st_mode):
            return f'a regular file, but "{shown}" is a symbolic link (copy the file into the inbox instead)'
        last = index == len(parts) - 1
        if last and not stat.S_ISREG(info.st_mode):
            return f'a regular file, but "{shown}" is a folder or special file'
        if not last and not stat.S_ISDIR(info.st_mode):
            return f'a path through folders, but "{shown}" is not a folder'
    return None
