"""Exactly one host ingests an upload: before a manifest becomes a staged job (and so before any of its files is
moved, to work/ or to failed/), its host claims it in the ledger under the upload's key. The loser leaves it alone
without a word: it is not lost, the winner takes it.

It makes the keys and remembers the claims it lost; the claim itself is one row written with the staged job
(Ledger.add_staged). It must not move files.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from daemon.ledger import JobRecord, Ledger
from daemon.watcher import Candidate
from inbox_schema.errors import readable


def upload_key(candidate: Candidate) -> str | None:
    """The manifest's path in the inbox and its file's identity (inode, size, change time): the same on every host
    that mounts the share, and new when the file is uploaded (or moved back in) again. None: it is gone."""
    try:
        st = os.lstat(candidate.manifest)
    except OSError:
        return None
    return f"{readable(candidate.key)}|{st.st_ino}|{st.st_size}|{st.st_ctime_ns}"


class IngestClaims:
    """This host's side of the claims: stage an upload only if it wins it; adopt only staged jobs it won."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.lost: set[str] = set()  # keys another host holds: not asked again

    def mine(self, job: JobRecord) -> bool:
        """Whether this host ingests that staged (or cancelled-while-staged) job."""
        holder = self.ledger.claim_holder(job.id)
        return holder is None or holder == self.ledger.host_id

    def others(self, candidate: Candidate) -> bool:
        """Whether another host already won this upload (known from an earlier try: no database call)."""
        key = upload_key(candidate)
        return key is None or key in self.lost

    def stage(self, candidate: Candidate, name: str, manifest: Path, deadline: datetime, max_attempts: int,
              message: str) -> JobRecord | None:
        """A new staged job for this upload, claimed by this host; None when another host claimed it first."""
        key = upload_key(candidate)
        if key is None or key in self.lost:
            return None
        record = self.ledger.add_staged(name, "unknown", manifest, deadline, max_attempts=max_attempts,
                                        message=message, claim=key)  # fmt: skip
        if record is None:
            self.lost.add(key)
        return record
