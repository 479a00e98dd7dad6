"""A full disk is the host's problem, not the job's: tell it apart from other OS errors, say which folder is full
and how much is free, and remove what an interrupted write left behind.

Classification and wording only; it must not decide a job's state (the pool driver and Failures do) nor delete
anything but the temporary file it is handed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, or the user's quota is used up


def full_disk_error(exc: BaseException | None) -> OSError | None:
    """The "no space" OSError behind `exc`, if any: libraries (PIL, PyAV, safetensors) raise their own errors
    from it, so the causes are followed too."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def is_disk_full(exc: BaseException) -> bool:
    return full_disk_error(exc) is not None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def disk_full_text(folder: Path, role: str) -> str:
    """"disk full: the outbox /srv/wanbox/outbox has 0.0 KiB free of 64.0 KiB": which folder, how much is left."""
    try:
        usage = shutil.disk_usage(folder)
        room = f"has {_size(usage.free)} free of {_size(usage.total)}"
    except OSError as exc:
        room = f"cannot be measured ({exc.strerror})"
    return f"disk full: the {role} {folder} {room}"


def full_folder(exc: OSError, fallback: Path | None) -> Path | None:
    """The folder whose disk is full: where the failed write was going, when the error says."""
    name = exc.filename if isinstance(exc.filename, str) else None
    return Path(name).parent if name else fallback


def no_space_text(exc: OSError, fallback: Path | None, doing: str) -> str:
    """"disk full: the folder /srv/wanbox/work/J has 0.0 KiB free of 1.0 MiB (preparing its inputs: No space left
    on device)": a job's error when one of its own writes found the disk full."""
    folder = full_folder(exc, fallback)
    where = disk_full_text(folder, "folder") if folder is not None else "disk full"
    return f"{where} ({doing}: {exc.strerror or exc})"


def disk_full_reason(folder: Path, role: str, retry_seconds: float) -> str:
    """The outbox's reason for status, show and the log: the folder, its free space, and that nothing is lost."""
    return (f"{disk_full_text(folder, role)}; nothing was delivered. Free some space there: the delivery is "
            f"retried every {retry_seconds:g} s, without counting against the job's attempts")


def waiting_for_space(error: str, retry_seconds: float) -> str:
    """A job's reason while a full disk (named in `error`) holds it back: for status, show and the log."""
    return (f"{error}. Nothing is lost: free some space there; the job is retried every {retry_seconds:g} s, "
            "without counting against its attempts")


@contextlib.contextmanager
def removed_on_error(temp: Path) -> Iterator[Path]:
    """Yield `temp` for writing; if the write fails (a full disk, above all), the partial file is removed."""
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
