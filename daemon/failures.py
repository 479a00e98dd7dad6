"""The one place a job fails: count the attempt in the ledger and, when it gives up, move its files to
failed/<name>/ with error.txt saying why and how to run it again; and where every end (done, failed, rejected)
is announced to whoever listens (notifications).

It must not decide whether an error is retryable (the caller knows) nor delete any input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from daemon import jobfiles
from daemon.journal import jlog, log
from daemon.ledger import Ledger
from daemon.states import ErrorKind, JobState

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

        Returns the state the job went to, or None when it had already moved on (e.g. cancelled)."""
        kind = ErrorKind(kind)
        to = self.ledger.record_failure(job_id, frm, error, kind, retryable)
        if to is None:
            return None
        jlog(logging.ERROR if to == S.FAILED else logging.WARNING, job_id, "%s (%s): %s -> %s", kind,
             "retryable" if retryable else "permanent", error, to)
        if to == S.FAILED:
            record = self.ledger.get(job_id)
            self.move_inputs(job_id, record.name, record.last_error or error, kind)
            self.ended(job_id)
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
            return
        dest = jobfiles.free_dir(self.failed, name)
        jobfiles.move_file(taken, dest)
        jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, failed_text(job_id, name, why, kind))
        # Remembered beside the job's work files, so that `wanbox retry` can bring them back.
        jobfiles.write_text_durably(taken.parent / jobfiles.FAILED_POINTER, str(dest))
        jlog(logging.INFO, job_id, "inputs moved to %s", dest)

    def bring_back_inputs(self, job_id: str) -> bool:
        """A retried job's inputs may sit in failed/<name>/: move them back into its work folder.
        True when they were there to bring back."""
        taken = jobfiles.work_inputs_dir(self.work, job_id)
        pointer = taken.parent / jobfiles.FAILED_POINTER
        failed_dir = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if taken.exists() or not failed_dir or not Path(failed_dir).is_dir():
            return False
        jobfiles.move_file(Path(failed_dir), taken)
        pointer.unlink()
        jlog(logging.INFO, job_id, "inputs taken back from %s for the retry", failed_dir)
        return True

    def reject_files(self, name: str, sources: list[tuple[Path, Path]], text: str) -> Path:
        """A rejected job's files (from the inbox) into a fresh failed/<name>/ with error.txt; its path."""
        if len(sources) == 1 and sources[0][1] == Path("."):
            # Folder layout: the whole folder becomes failed/<name>/, then error.txt is added.
            dest = jobfiles.free_dir(self.failed, name)
            jobfiles.move_file(sources[0][0], dest)
            jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, text)
            return dest
        return jobfiles.to_failed(self.failed, name, sources, text)
