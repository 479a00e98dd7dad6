"""A full disk is the host's problem, not the job's: tell it apart from other OS errors, say which folder is full
and how much is free, and remove what an interrupted write left behind.

Classification and wording only; it must not decide a job's state (the pool driver does) nor delete anything but
the temporary file it is handed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, or the user's quota is used up


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def disk_full_reason(folder: Path, role: str, retry_seconds: float) -> str:
    """"disk full: the outbox /srv/wanbox/outbox has 0.0 KiB free of 64.0 KiB; ..." for status, show and the log."""
    try:
        usage = shutil.disk_usage(folder)
        room = f"has {_size(usage.free)} free of {_size(usage.total)}"
    except OSError as exc:
        room = f"cannot be measured ({exc.strerror})"
    return (f"disk full: the {role} {folder} {room}; nothing was delivered. Free some space there: the delivery is "
            f"retried every {retry_seconds:g} s, without counting against the job's attempts")


@contextlib.contextmanager
def removed_on_error(temp: Path) -> Iterator[Path]:
    """Yield `temp` for writing; if the write fails (a full disk, above all), the partial file is removed."""
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
