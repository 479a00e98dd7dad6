"""Staged jobs held back by the host, not by their uploader: a full work/ disk while their files are taken in, a
failed/ that their rejection cannot be written to, and an inbox outage. None of it may cost the job its staging
deadline or end it without a reason the user can see.

It keeps the retry times and the outage clock, and moves staged deadlines in the ledger; it must not move files
or decide a job's state (daemon/intake.py does).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

from daemon.diskspace import disk_full_text, full_disk_error, waiting_for_space
from daemon.journal import jlog, log
from daemon.ledger import Ledger, utcnow


class Holds:
    """Which staged jobs wait for the host until when, and how long the inbox was away."""

    def __init__(self, ledger: Ledger, deadline_seconds: float) -> None:
        self.ledger, self.deadline_seconds = ledger, deadline_seconds
        self._until: dict[str, float] = {}  # job id -> monotonic time of the next try
        self._last_scan = time.monotonic()  # the last scan that found the inbox
        self._away_since: float | None = None  # when the inbox was last seen, during an outage

    @property
    def retry_seconds(self) -> float:
        return self.ledger.backoff.delay(1).total_seconds()

    def held(self, job_id: str) -> bool:
        return time.monotonic() < self._until.get(job_id, float("-inf"))

    def hold(self, job_id: str, reason: str) -> None:
        """Try again after the base backoff; meanwhile status and show give `reason`, and the staging deadline
        is a full one from now, so that the host's trouble never counts against the upload."""
        if job_id not in self._until:
            jlog(logging.ERROR, job_id, "%s", reason)
        self._until[job_id] = time.monotonic() + self.retry_seconds
        self.ledger.note_waiting(job_id, reason)
        self.ledger.postpone_staged(timedelta(0), job_id, floor=utcnow() + timedelta(seconds=self.deadline_seconds))

    def scanned(self, found: bool) -> None:
        """After each scan: an outage's length is added to every staged deadline once the inbox is back, so an
        upload that was fine when the share went away is judged on the time it really had."""
        now = time.monotonic()
        if not found:
            if self._away_since is None:
                self._away_since = self._last_scan
            return
        self._last_scan = now
        if self._away_since is not None:
            away = timedelta(seconds=now - self._away_since)
            self._away_since = None
            moved = self.ledger.postpone_staged(away)
            log.warning("inbox outage over after %.0f s: %d staged deadline(s) moved by as much", away.total_seconds(),
                        moved)


def take_in_blocked(exc: OSError, work_root: Path, retry_seconds: float) -> str | None:
    """The waiting reason when taking a job's files into work/ found the disk full (None: another error)."""
    full = full_disk_error(exc)
    if full is None:
        return None
    error = f"{disk_full_text(work_root, 'folder')} (taking the job's files in: {full.strerror or full})"
    return waiting_for_space(f"{error}; the upload stays in the inbox, untouched", retry_seconds)


def reject_blocked(exc: OSError, failed_root: Path, summary: str, retry_seconds: float) -> str:
    """The waiting reason of a rejected job whose files and error.txt cannot be written to failed/."""
    full = full_disk_error(exc)
    where = (disk_full_text(failed_root, "failed folder") if full is not None
             else f"the failed folder {failed_root} cannot take it ({exc.strerror or exc})")
    return (f"rejected, but its reason cannot be written to failed/: {where}. The reason: {summary}. The files "
            f"stay in the inbox; moving them to failed/ is retried every {retry_seconds:g} s")
