"""Deleting the work folders of delivered jobs: `wanbox prune`, and `[jobs] prune_after_days` in the daemon.

A job's work folder (work/<id>/) keeps its original inputs and the prepared intermediates after the video is
delivered, so that nothing a person dropped is lost on the way. Over weeks that grows without bound. Only
jobs in `done` are pruned: their video and sidecar are in the outbox (the sidecar records every input's
sha256). Failed and cancelled jobs keep everything for `wanbox retry`. The ledger keeps the job's record.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from daemon.ledger import Ledger
from daemon.states import JobState


@dataclass(frozen=True)
class Pruned:
    job_id: str
    name: str
    folder: Path
    bytes: int


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under folder (links are not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total


def prune_done(ledger: Ledger, work_root: Path, older_than: timedelta, *, dry_run: bool = False,
               now: datetime | None = None) -> list[Pruned]:  # fmt: skip
    """Delete work/<id>/ of every job delivered before now - older_than; what was (or would be) removed."""
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    work_root = Path(work_root)
    pruned = []
    for job in ledger.list([JobState.DONE], limit=None, newest_first=False):
        folder = work_root / job.id
        # Only a real folder directly under work/ named after the job: never follow a link out of it.
        if job.updated_at > cutoff or folder.is_symlink() or not folder.is_dir() or folder.parent != work_root:
            continue
        size = folder_bytes(folder)
        if not dry_run:
            shutil.rmtree(folder)
        pruned.append(Pruned(job.id, job.name, folder, size))
    return pruned
