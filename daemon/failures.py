"""The one place a job fails: count the attempt in the ledger and, when it gives up, move its files to
failed/<name>/ with error.txt saying why and how to run it again; and where every end (done, failed, rejected)
is announced to whoever listens (notifications).

Moving files to failed/ (a failure's or a rejection's) is exactly once: the folder's name and the reason are
recorded in the ledger (an intent) before any file moves, and `complete_*` redoes that very plan after a
crash. It must not decide whether an error is retryable (the caller knows) nor delete any input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import jobfiles, moves
from daemon.diskspace import waiting_for_space
from daemon.faults import kill_point
from daemon.journal import jlog, log
from daemon.ledger import Ledger, utcnow
from daemon.ledger.intents import FAIL, REJECT, Intents
from daemon.states import RETRY_STATE, ErrorKind, JobState

S = JobState


def failed_text(job_id: str, name: str, why: str, kind: ErrorKind | None = None) -> str:
    """error.txt for a job that was accepted but could not be made into a video: what to do depends on whose
    problem it was (an input of the job, or the installation)."""
    if kind == ErrorKind.INPUT:
        again = ("The problem is in the job's own files or parameters: upload a corrected file (or manifest) and\n"
                 "submit the job again (`wanbox submit FILE`, or copy the media into the inbox first and the\n"
                 "manifest last). Or replace the file in this folder under the same name and run\n"
                 f"`wanbox retry {job_id}` (retry takes the files back from this folder).\n")
    else:
        again = (f"To run it again unchanged (e.g. after fixing the installation): wanbox retry {job_id}\n"
                 "  (retry takes the files back from this folder).\n"
                 "To change it: fix the manifest and submit it again (`wanbox submit FILE`, or copy the media into\n"
                 "the inbox first and the manifest last).\n")
    return (f"wanbox could not make the video for job {job_id} ({name}):\n\n  * {why}\n\n"
            "The job's original files are in this folder; nothing was deleted.\n" + again)


class Failures:
    """Fails jobs for the supervisor's parts: the ledger's attempt count, then failed/<name>/ when it gives up."""

    def __init__(self, ledger: Ledger, work: Path, failed: Path,
                 on_end: Callable[[str], None] | None = None) -> None:
        self.ledger, self.work, self.failed = ledger, work, failed
        self.intents = Intents(ledger)
        self.on_end = on_end  # told each job id that reached done, failed or rejected

    def ended(self, job_id: str) -> None:
        """A job reached an end state (done, failed, rejected): tell the listener; its trouble is not the job's."""
        if self.on_end is None:
            return
        try:
            self.on_end(job_id)
        except Exception:  # a notification must never undo or block the job's own outcome
            log.exception("job %s: telling about its end failed", job_id)

    def fail(self, job_id: str, frm: JobState, error: str, kind: ErrorKind | str, retryable: bool) -> JobState | None:
        """Count a failed attempt: back in line after a backoff, or failed for good with its files in failed/.

        Returns the state the job went to, or None when it had already moved on (e.g. cancelled). A full disk
        is the host's trouble, not the job's: it waits instead (`wait_for_space`)."""
        kind = ErrorKind(kind)
        if kind == ErrorKind.DISK and frm in RETRY_STATE:
            return self.wait_for_space(job_id, frm, error)
        to = self.ledger.record_failure(job_id, frm, error, kind, retryable)
        if to is None:
            return None
        kill_point("fail.counted")
        jlog(logging.ERROR if to == S.FAILED else logging.WARNING, job_id, "%s (%s): %s -> %s", kind,
             "retryable" if retryable else "permanent", error, to)
        if to == S.FAILED:
            record = self.ledger.get(job_id)
            self.move_inputs(job_id, record.name, record.last_error or error, kind)
            self.ended(job_id)
        return to

    def wait_for_space(self, job_id: str, frm: JobState, error: str) -> JobState | None:
        """Back to the step whose output the full disk stopped, after the base backoff, attempts untouched (as
        often as it takes); the reason, naming the folder, is the job's last error for status and show."""
        delay = self.ledger.backoff.delay(1)
        why = waiting_for_space(error, delay.total_seconds())
        to = RETRY_STATE[frm]
        if not self.ledger.transition(job_id, frm, to, f"waits for disk space: {why}", last_error=why,
                                      error_kind=ErrorKind.DISK, retry_after=utcnow() + delay):
            return None
        jlog(logging.ERROR, job_id, "%s", why)
        return to

    def give_up(self, job_id: str, frm: JobState, why: str, kind: ErrorKind) -> bool:
        """Fail a job for good without counting an attempt (it can never run here as things are)."""
        if not self.ledger.transition(job_id, frm, S.FAILED, f"failed: {why}", last_error=why, error_kind=kind):
            return False
        jlog(logging.ERROR, job_id, "failed: %s", why)
        self.move_inputs(job_id, self.ledger.get(job_id).name, why, kind)
        self.ended(job_id)
        return True

    def move_inputs(self, job_id: str, name: str, why: str, kind: ErrorKind | None = None) -> None:
        """A failed job's original files go to failed/<name>/ with error.txt; `retry` brings them back."""
        taken = jobfiles.work_inputs_dir(self.work, job_id)
        if not taken.exists():
            self.intents.clear(job_id, FAIL)
            return
        plan = {"failed_dir": str(jobfiles.free_dir(self.failed, name)), "text": failed_text(job_id, name, why, kind)}
        plan = self.intents.record(job_id, FAIL, plan)  # an interrupted try's plan wins: the same folder
        kill_point("fail.intent")
        if os.path.lexists(plan["failed_dir"]):  # inputs still here, so that folder is someone else's
            plan = {**plan, "failed_dir": str(jobfiles.free_dir(self.failed, name))}
            self.intents.replace(job_id, FAIL, plan)
        self.complete_fail(job_id, plan)

    def complete_fail(self, job_id: str, plan: dict[str, Any]) -> None:
        """Do (or finish) a planned failure move: error.txt written beside the inputs first, so the folder
        appears in failed/ with its reason in one rename; the pointer for `retry` before the move."""
        taken = jobfiles.work_inputs_dir(self.work, job_id)
        dest = Path(plan["failed_dir"])
        moves.settle(taken, dest)  # a copy onto another filesystem that a kill interrupted
        if taken.exists():
            jobfiles.write_text_durably(taken / jobfiles.ERROR_FILE, plan["text"])
            kill_point("fail.reason_written")
            # Remembered beside the job's work files, so that `wanbox retry` can bring them back.
            jobfiles.write_text_durably(taken.parent / jobfiles.FAILED_POINTER, str(dest))
            kill_point("fail.pointer_written")
            jobfiles.move_file(taken, dest, "fail")
            kill_point("fail.moved")
            jlog(logging.INFO, job_id, "inputs moved to %s", dest)
        elif dest.is_dir() and not (dest / jobfiles.ERROR_FILE).exists():
            jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, plan["text"])
        self.intents.clear(job_id, FAIL)

    def recover(self) -> list[str]:
        """At start-up: finish the failure moves a crash interrupted (as planned), and move the files of failed
        jobs whose move never began. Returns the failed jobs whose end is to be announced now."""
        ended = []
        for intent in self.intents.pending():
            if intent.action == FAIL:
                taken = jobfiles.work_inputs_dir(self.work, intent.job_id)
                jobfiles.remove_temps(taken, (jobfiles.ERROR_FILE,))
                jobfiles.remove_temps(taken.parent, (jobfiles.FAILED_POINTER,))
                self.complete_fail(intent.job_id, intent.plan)
                if self.ledger.get(intent.job_id).state == S.FAILED:
                    ended.append(intent.job_id)
        for record in self.ledger.list(states=[S.FAILED], limit=None):
            if record.holder not in (None, self.ledger.host_id):
                continue  # another host failed it: its files are that host's to move
            if jobfiles.work_inputs_dir(self.work, record.id).exists():  # failed, then died before the move
                self.move_inputs(record.id, record.name, record.last_error or "it failed", record.error_kind)
                ended.append(record.id)
        return ended

    def bring_back_inputs(self, job_id: str) -> bool:
        """A retried job's inputs may sit in failed/<name>/: move them back into its work folder.
        True when they were there to bring back."""
        taken = jobfiles.work_inputs_dir(self.work, job_id)
        pointer = taken.parent / jobfiles.FAILED_POINTER
        failed_dir = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if not failed_dir:
            return False
        both = taken.exists() and os.path.lexists(failed_dir)  # a kill interrupted a copy back: finish it
        if not (both and moves.settle(Path(failed_dir), taken)):
            if taken.exists() or not Path(failed_dir).is_dir():
                return False
            jobfiles.move_file(Path(failed_dir), taken)
        (taken / jobfiles.ERROR_FILE).unlink(missing_ok=True)  # our reason file, written at the failure
        pointer.unlink()
        jlog(logging.INFO, job_id, "inputs taken back from %s for the retry", failed_dir)
        return True

    def reject_files(self, job_id: str, name: str, sources: list[tuple[Path, Path]], text: str,
                     transition: dict[str, Any] | None = None) -> Path:
        """A rejected job's files (from the inbox) into a fresh failed/<name>/ with error.txt; its path.

        `transition` ({"message", "fields"}) is the ledger move the caller makes afterwards, kept in the plan so
        that a restart can make it too. A source `(folder, ".")` moves a whole job folder."""
        plan = {"failed_dir": str(jobfiles.free_dir(self.failed, name)), "text": text,
                "sources": [[str(src), str(rel)] for src, rel in sources], "transition": transition}  # fmt: skip
        plan = self.intents.record(job_id, REJECT, plan)
        kill_point("reject.intent")
        return self.complete_reject(plan)

    def complete_reject(self, plan: dict[str, Any]) -> Path:
        """Do (or finish) a planned rejection move. Folder layout: one rename, then error.txt (the intent
        covers the gap); flat: the folder and error.txt first, then the inputs, the manifest last. A source no
        longer there was moved before the crash (or taken back by its owner): nothing to do for it."""
        dest = Path(plan["failed_dir"])
        sources = [(Path(src), Path(rel)) for src, rel in plan["sources"]]
        if len(sources) == 1 and sources[0][1] == Path("."):
            moves.settle(sources[0][0], dest)  # a copy onto another filesystem that a kill interrupted
            if os.path.lexists(sources[0][0]) and not os.path.lexists(dest):
                jobfiles.move_file(sources[0][0], dest, "reject")
                kill_point("reject.moved_folder")
            if not dest.is_dir():
                dest.mkdir(parents=True)  # the folder was taken back meanwhile: the reason still gets a home
        else:
            dest.mkdir(parents=True, exist_ok=True)
            kill_point("reject.dir_made")
        if not (dest / jobfiles.ERROR_FILE).exists():
            jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, plan["text"])
            kill_point("reject.reason_written")
        for i, (src, rel) in enumerate(sources):  # the caller lists the inputs first, the manifest last
            moves.settle(src, dest / rel)
            if rel != Path(".") and os.path.lexists(src) and not os.path.lexists(dest / rel):
                jobfiles.move_file(src, dest / rel, "reject")
                kill_point("reject.moved_manifest" if i == len(sources) - 1 else "reject.moved_input")
        return dest
