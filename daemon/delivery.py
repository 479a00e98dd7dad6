"""Finalize, exactly once: a job's video is checked, its outbox names chosen and recorded in the ledger (a
finalize intent, with the sidecar's content) before any file is written, the files completed, then `done`.

After a crash the same intent is completed (or verified) under the same names: never a second copy. It owns
that order; it must not sample, and it writes outbox files only through daemon/outbox.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from daemon import jobfiles
from daemon.faults import kill_point
from daemon.ledger import JobRecord, LeaseLost, Ledger
from daemon.ledger.intents import FINALIZE, Intents
from daemon.outbox import NameTaken, Outbox, OutputInvalid, check_output, extra_outputs, probe_video
from daemon.states import JobState
from inbox_schema import file_sha256

S = JobState
log = logging.getLogger("wanbox.delivery")
RESUME_DIR = "resume"  # work/<id>/resume/: the pool's sampling checkpoint of the job
MAX_RENAMES = 100  # foreign files taking the chosen names again and again: give up (an error, retried)


class Delivery:
    """plan -> complete -> finish, each step safe to redo."""

    def __init__(self, ledger: Ledger, outbox: Outbox) -> None:
        self.ledger, self.outbox, self.intents = ledger, outbox, Intents(ledger)

    def check(self, record: JobRecord, video: Path, stats: dict[str, Any]) -> None:
        """OutputInvalid unless the video decodes to the frames, size and fps the job and the worker say."""
        check_output(probe_video(video), record.job, stats)

    def plan(self, record: JobRecord, video: Path, document: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        """Choose the outbox base name (the one an interrupted try chose, if any) and record it with the sidecar
        and what the worker said it wrote (to check the video again on a redo)."""
        self.still_held(record.id)  # before anything in the outbox is touched (withdrawn or written)
        extras = extra_outputs(record)
        digest = file_sha256(video)
        known = self.intents.get(record.id)
        base = known.plan["base"] if known is not None and known.action == FINALIZE else None
        if base is not None and known.plan.get("video_sha256") not in (None, digest):
            # Sampled again after an interrupted delivery, into a different video (GPU noise): the first one's
            # files under our name go, so that the name carries one delivery, whole.
            self.outbox.withdraw(base, known.plan["video_sha256"], record.id, extras)
        plan = {"base": base or self.outbox.free_name(record.name, extras), "video_sha256": digest, "video": str(video),
                "document": json.loads(json.dumps(document, default=str)),
                "stats": {k: stats[k] for k in ("frames", "width", "height", "fps") if k in stats}}  # fmt: skip
        self.intents.replace(record.id, FINALIZE, plan)
        kill_point("finalize.intent")
        return plan

    def complete(self, record: JobRecord, video: Path, plan: dict[str, Any]) -> dict[str, str]:
        """Write (or verify) every file of the planned delivery; a name held by another job's file moves the
        whole delivery to the next free name (the -2 rule), recorded before anything is written there."""
        extras = extra_outputs(record)
        for _ in range(MAX_RENAMES):
            try:
                return self.outbox.complete(video, plan["base"], plan["document"], extras,
                                            guard=lambda: self.still_held(record.id))
            except NameTaken:
                plan = {**plan, "base": self.outbox.free_name(record.name, extras)}
                self.intents.replace(record.id, FINALIZE, plan)
        raise NameTaken(f"{self.outbox.root}: no free name for {record.name!r} after {MAX_RENAMES} tries")

    def still_held(self, job_id: str) -> None:
        """Fencing before an outbox write: LeaseLost once another host took the job (this one froze or was cut off
        past its lease), so that a second copy is never delivered."""
        if not self.ledger.holds(job_id):
            raise LeaseLost(job_id, self.ledger.host_id or "?")

    def finish(self, record: JobRecord, outputs: dict[str, str]) -> bool:
        """finalizing -> done (fenced: LeaseLost when another host holds the job now), then the work files that are
        no longer needed go; True if this call moved it."""
        outputs = {**(record.outputs_json or {}), **outputs}
        moved = self.ledger.transition(record.id, S.FINALIZING, S.DONE, f"delivered {outputs['video']}",
                                       outputs_json=outputs)  # fmt: skip
        if not moved:
            self.still_held(record.id)
        kill_point("finalize.recorded")
        self.clean(record)
        return moved

    def withdraw(self, record: JobRecord) -> None:
        """A delivery that failed part way (a full disk, a foreign file): its files published so far are removed
        and its intent forgotten, so the next attempt delivers whole, under a freshly chosen name."""
        known = self.intents.get(record.id)
        if known is None or known.action != FINALIZE:
            return
        try:
            self.outbox.withdraw(known.plan["base"], known.plan["video_sha256"], record.id, extra_outputs(record))
        except OSError as exc:
            log.error("job %s: could not remove its partial delivery under %r: %s", record.id, known.plan["base"], exc)
            return  # the intent stays: the next attempt reuses (and completes or replaces) these names
        self.intents.clear(record.id, FINALIZE)

    def recover(self) -> list[str]:
        """At start-up, before running jobs are put back in line: a job that was finalizing with its video still
        in work/ is delivered under the names it chose (verifying what is there). Returns the jobs now done."""
        done = []
        for intent in self.intents.pending():
            if intent.action != FINALIZE:
                continue
            record = self.ledger.get(intent.job_id)
            if record.state == S.DONE:
                self.clean(record)  # died after recording done: only the clean-up was left
                continue
            video = Path(intent.plan.get("video") or Path(record.work_dir or "/nonexistent") / jobfiles.OUTPUT_FILE)
            if record.state != S.FINALIZING or not video.is_file():
                continue  # sampled again later, under the same names (the intent stays)
            try:
                self.check(record, video, intent.plan.get("stats", {}))
                outputs = self.complete(record, video, intent.plan)
                if not self.finish(record, outputs):
                    continue
            except LeaseLost:
                log.warning("job %s: not delivered here: lease lost (another host took it)", record.id)
                continue
            except (OutputInvalid, OSError) as exc:
                log.warning("job %s: its interrupted delivery cannot be completed (%s); it is sampled again",
                            record.id, exc)
                continue
            done.append(record.id)
        return done

    def clean(self, record: JobRecord) -> None:
        self.intents.clear(record.id, FINALIZE)
        work = Path(record.work_dir or "/nonexistent")
        for video in work.glob(jobfiles.OUTPUT_GLOB):  # every attempt's (any host's): a copy is in the outbox
            video.unlink(missing_ok=True)  # inputs stay in work/
        shutil.rmtree(work / RESUME_DIR, ignore_errors=True)  # delivered: nothing to resume
        kill_point("finalize.cleaned")
