"""Intake: manifests found in the inbox become staged jobs, then accepted (files moved to work/<id>/) or rejected
(files moved to failed/<name>/ with the reason).

It owns the watcher and what is known about each staged manifest between ticks; it must never open a symlink or
special file, never crash on user input, and never delete or overwrite an inbox file.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from daemon import jobfiles, moves
from daemon.config import Config
from daemon.failures import Failures
from daemon.faults import kill_point
from daemon.holds import Holds, reject_blocked, take_in_blocked
from daemon.ingest import IngestClaims
from daemon.jobfiles import JobFiles
from daemon.journal import jlog, log
from daemon.ledger import JobRecord, Ledger
from daemon.ledger.intents import ACCEPT, REJECT
from daemon.states import ErrorKind, JobState
from daemon.watcher import Candidate, InboxWatcher, StabilityTracker, check_inbox
from inbox_schema import (
    InputFile,
    Job,
    ManifestError,
    ManifestInvalid,
    file_sha256,
    load_manifest,
    render_errors,
)
from inbox_schema.defaults import MANIFEST_MAX_BYTES
from inbox_schema.errors import readable
from inbox_schema.hashing import manifest_hash
from inbox_schema.job import LIBRARY
from inbox_schema.loras import library_problem

S = JobState
MAX_INTAKE_CRASHES = 5  # internal errors on one manifest before it is rejected instead of retried forever
SEED_LIMIT = 2**31  # a seed every backend accepts (torch.Generator takes 64 bits, numpy 32)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Staging:
    """What intake knows about a staged manifest between ticks (rebuilt after a restart)."""

    job_id: str
    signature: tuple[int, int]
    job: Job | None = None  # when the manifest parsed
    waiting: str = ""  # why it is not accepted yet (the rejection reason at the deadline)
    hashes: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)  # path -> (sig, sha256)
    # When this daemon began watching it, first and last checked its inputs (monotonic): a deadline that passed
    # while the daemon was down waits until the inputs themselves were watched settling (a manifest settles
    # first, so its own sighting is too early), so the reason given is the real one.
    seen_at: float = field(default_factory=time.monotonic)
    first_checked_at: float | None = None
    checked_at: float = float("-inf")


def file_kind(path: Path) -> str:
    """"file", "symlink", "folder", "special file" or "missing file", by lstat (never opening it)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing file"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(mode) else "special file"


def signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class Intake:
    """inbox -> staged -> queued | rejected, one `tick` at a time."""

    def __init__(self, config: Config, ledger: Ledger, failures: Failures, stopping: threading.Event) -> None:
        self.cfg, self.paths, self.ledger, self.failures, self.stopping = config, config.paths, ledger, failures, stopping
        self.watcher = InboxWatcher(self.paths.inbox, config.inbox.rescan_seconds, config.inbox.polling)
        self.tracker = StabilityTracker(config.inbox.settle_seconds)
        self.staging: dict[str, Staging] = {}  # manifest path -> what we know
        self.claims = IngestClaims(ledger)  # which uploads this host ingests (several hosts may watch one inbox)
        self.holds = Holds(ledger, config.inbox.staged_deadline_seconds)  # waiting for the host, not the upload
        self._crashes: dict[str, int] = {}  # manifest -> internal errors while looking at it
        # LoRA library file -> (size, mtime), sha256: one hash per library file and version, shared by every job
        self.library_hashes: dict[str, tuple[tuple[int, int], str]] = {}

    @property
    def outage(self) -> str | None:
        return self.watcher.outage

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    # --- after a crash ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """Staged jobs interrupted while their files were being moved to work/: the files go back to the inbox."""
        try:
            check_inbox(self.paths.inbox)
        except OSError as exc:
            log.error("INBOX OUTAGE at start-up: %s; staged jobs keep waiting", exc)
            return
        self._redo_intents()
        for record in self.ledger.list(states=[S.STAGED], limit=None):
            if self.claims.mine(record):  # another host's staged job is that host's to recover
                self._recover_staged(record)

    def _redo_intents(self) -> None:
        """Rejections a crash interrupted are finished as planned (same folder, same reason) before anything
        else looks at the inbox; an interrupted acceptance is undone below (its files go back to the inbox)."""
        for intent in self.failures.intents.pending():
            if intent.action == REJECT:
                try:
                    self._redo_reject(intent.job_id, intent.plan)
                except OSError as exc:  # failed/ still full or unwritable: the staged job retries it, saying why
                    log.error("job %s: an interrupted rejection cannot be completed yet: %s", intent.job_id, exc)
            elif intent.action == ACCEPT and self.ledger.get(intent.job_id).state != S.STAGED:
                self.failures.intents.clear(intent.job_id, ACCEPT)  # accepted: only forgetting it was left

    def _redo_reject(self, job_id: str, plan: dict[str, Any]) -> None:
        jobfiles.remove_temps(Path(plan["failed_dir"]), (jobfiles.ERROR_FILE,))
        dest = self.failures.complete_reject(plan)
        if plan.get("transition"):
            self.finish_reject(job_id, dest, plan["transition"])
        else:
            self.failures.intents.clear(job_id, REJECT)
        jlog(logging.WARNING, job_id, "an interrupted rejection was completed: %s", dest)

    def _recover_staged(self, record: JobRecord) -> None:
        taken = jobfiles.work_inputs_dir(self.paths.work, record.id)
        moves.remove_copying(taken.parent)  # copies onto another filesystem that a kill interrupted
        if not taken.exists():
            if not os.path.lexists(record.manifest_path):
                why = "the manifest was removed from the inbox (while the daemon was stopped) before it was accepted"
                if self.ledger.transition(record.id, S.STAGED, S.REJECTED, f"rejected: {why}", last_error=why,
                                          error_kind=ErrorKind.INPUT):
                    self.failures.ended(record.id)
                jlog(logging.WARNING, record.id, "rejected: %s", why)
            return
        manifest = Path(record.manifest_path)
        folder = manifest.parent.name if manifest.name == "job.toml" and manifest.parent != self.paths.inbox else None
        stayed = jobfiles.return_to_inbox(taken, self.paths.inbox, folder)
        self.failures.intents.clear(record.id, ACCEPT)
        jlog(logging.WARNING, record.id, "an interrupted intake was undone: files returned to the inbox%s",
             f" (kept in {taken}: names taken again: {stayed})" if stayed else "")

    # --- one turn ----------------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.stopping.is_set():
            return
        if not (self.watcher.due() or self.staging):
            return
        candidates = self.watcher.scan()
        self.holds.scanned(candidates is not None)
        if candidates is None:
            return  # outage: nothing is read as deleted
        seen = set()
        for candidate in candidates:
            seen.add(str(candidate.manifest))
            try:
                self.consider(candidate)
            except Exception as exc:  # user input must never take the daemon down
                self._crashed(candidate, exc)
        self._forget_vanished(seen)
        self._reject_overdue()

    def _crashed(self, candidate: Candidate, exc: Exception) -> None:
        """Log it; after a few tries reject the job saying so, so that one odd upload cannot wedge intake."""
        key = str(candidate.manifest)
        self._crashes[key] = self._crashes.get(key, 0) + 1
        if self._crashes[key] == 1:
            log.exception("internal error while looking at %s: %s (will retry)", candidate.manifest, exc)
        if self._crashes[key] < MAX_INTAKE_CRASHES:
            return
        self._crashes.pop(key)
        entry = self.staging.get(key)
        why = (f"wanbox hit an internal error while taking this job in ({type(exc).__name__}: {exc}); "
               "please report it with the daemon's log")
        try:
            if entry is None:
                entry = self._stage(candidate, signature(candidate.manifest))
            if entry is not None:
                self.reject(entry.job_id, candidate, [why])
        except Exception:
            log.exception("could not reject %s after repeated internal errors", candidate.manifest)

    def consider(self, candidate: Candidate) -> None:
        held = self.staging.get(str(candidate.manifest))
        if held is not None and self.holds.held(held.job_id):
            return  # waits for space in work/ or failed/: tried again after a pause
        if readable(candidate.key) != candidate.key:
            self._reject_unreadable_name(candidate)
            return
        manifest = candidate.manifest
        key = str(manifest)
        kind = file_kind(manifest)
        if kind != "file":
            # Never open it: a symlink may lead out of the inbox, a FIFO would block the daemon forever.
            expected = "a regular file" + (", not a symbolic link" if kind == "symlink" else f", not a {kind}")
            if kind == "symlink" and candidate.folder is None and os.path.isdir(manifest):
                expected = ("a job folder or a .toml file, not a symbolic link to a folder (its target was left "
                            "untouched; the link is here, beside this file): copy the folder itself into the inbox")
            self._reject_new(candidate, [ManifestError("manifest", candidate.key, expected)])
            return
        if not self.tracker.is_stable(manifest):
            return  # still being written
        sig = signature(manifest)
        if sig is not None and sig[0] > MANIFEST_MAX_BYTES:  # do not even read it
            self._reject_new(candidate, [ManifestError("manifest", f"{sig[0]} bytes",
                                                       f"a manifest of at most {MANIFEST_MAX_BYTES} bytes")])
            return
        entry = self.staging.get(key)
        if entry is not None and self._left_staging(entry, candidate):
            return
        if entry is None:
            entry = self._stage(candidate, sig)
            if entry is None:
                return
        if entry.signature != sig or entry.job is None:
            entry.signature = sig
            try:
                entry.job = load_manifest(manifest, self.paths.inbox, lora_library=self.cfg.pool.lora_library)
            except ManifestInvalid as exc:
                self.reject(entry.job_id, candidate, exc.errors)
                return
        self._check_inputs(candidate, entry)

    def _reject_unreadable_name(self, candidate: Candidate) -> None:
        """A manifest or job folder whose name is not UTF-8: the ledger, the log and error.txt cannot hold the name
        as it is, so the job is staged and rejected under a readable form of it (bytes shown as \\xNN), never left
        in the inbox without a word."""
        shown, name = readable(candidate.key), readable(candidate.default_name)
        deadline = utcnow() + timedelta(seconds=self.cfg.inbox.staged_deadline_seconds)
        record = self.claims.stage(candidate, name, Path(readable(str(candidate.manifest))), deadline,
                                   self.cfg.jobs.max_attempts, f"manifest {shown} found in the inbox")
        if record is None:
            return  # another host rejects it
        error = ManifestError("manifest", shown, "a file or folder name in UTF-8 (this one has bytes that are not text "
                                                 "in UTF-8: rename it, e.g. with only letters, digits, '-' and '_')")
        sources = ([(candidate.folder, Path("."))] if candidate.folder is not None
                   else [(candidate.manifest, Path(readable(candidate.manifest.name)))])
        transition = {"message": f"rejected: {error}",
                      "fields": {"last_error": str(error), "error_kind": ErrorKind.INPUT.value}}
        dest = self.failures.reject_files(record.id, name, sources, render_errors([error], shown), transition)
        self.finish_reject(record.id, dest, transition)
        jlog(logging.WARNING, record.id, "rejected (%s): %s -> %s", shown, error, dest)

    def _left_staging(self, entry: Staging, candidate: Candidate) -> bool:
        """A person cancelled the staged job (`wanbox cancel`): its manifest leaves the inbox for failed/."""
        record = self.ledger.get(entry.job_id)
        if record.state == S.STAGED:
            return False
        self._forget(str(candidate.manifest), self._files(candidate, None))
        if record.state == S.CANCELLED:
            self._clear_cancelled_staged(record, candidate)
        return True

    def _stage(self, candidate: Candidate, sig: tuple[int, int] | None) -> Staging | None:
        """The ledger's staged job for this manifest (after a restart) or a new one; None when it is another host's
        (claimed by it: that host ingests it)."""
        if self.claims.others(candidate):
            return None
        known = self.ledger.find_by_manifest(candidate.manifest)
        if known is not None and not self.claims.mine(known):
            return None
        if known is None:
            ended = self.ledger.find_by_manifest(candidate.manifest, states=[S.CANCELLED])
            if ended is not None and ended.work_dir is None and self.claims.mine(ended):
                self._clear_cancelled_staged(ended, candidate)
                return None
            deadline = utcnow() + timedelta(seconds=self.cfg.inbox.staged_deadline_seconds)
            known = self.claims.stage(candidate, candidate.default_name, candidate.manifest, deadline,
                                      self.cfg.jobs.max_attempts, f"manifest {candidate.key} found in the inbox")
            if known is None:
                return None
            jlog(logging.INFO, known.id, "staged from %s", candidate.key)
        entry = Staging(known.id, sig or (0, 0))
        self.staging[str(candidate.manifest)] = entry
        return entry

    def _reject_new(self, candidate: Candidate, errors: list[ManifestError]) -> None:
        entry = self.staging.get(str(candidate.manifest)) or self._stage(candidate, None)
        if entry is not None:
            self.reject(entry.job_id, candidate, errors)

    def _input_problem(self, entry: Staging, item: InputFile) -> str | None:
        """Why this input (or uploaded LoRA) is not ready yet, or None when present, stable and as declared."""
        field_name = item.field.removesuffix(".path")
        sig = signature(item.path)
        if sig is None:
            return f"{field_name} = {item.relpath!r}: the file is not in the inbox (yet)"
        if file_kind(item.path) != "file":  # replaced by a link or special file after validation
            return f"{field_name} = {item.relpath!r}: expected a regular file, found a {file_kind(item.path)}"
        if not self.tracker.is_stable(item.path):
            return f"{field_name} = {item.relpath!r}: the file is still changing (upload in progress?)"
        if item.size is not None and sig[0] != item.size:
            return f"{field_name}.size: the file has {sig[0]} bytes, expected {item.size} (as declared)"
        digest = self._sha256(entry.hashes, item.path, sig)
        if item.sha256 is not None and digest != item.sha256:
            return f"{field_name}.sha256: the file's sha256 is {digest}, expected {item.sha256} (as declared)"
        return None

    @staticmethod
    def _sha256(cache: dict[str, tuple[tuple[int, int], str]], path: Path, sig: tuple[int, int] | None) -> str:
        """The file's sha256, hashed again only when its size or mtime changed."""
        cached = cache.get(str(path))
        if cached is None or cached[0] != sig:
            cached = (sig or (0, 0), file_sha256(path))
            cache[str(path)] = cached
        return cached[1]

    def _library_problems(self, entry: Staging) -> list[str]:
        """[[lora]] library files that are gone, lead out of the library, or differ from their declared sha256
        (checked at validation; again here, just before acceptance records their hashes)."""
        assert entry.job is not None
        problems = []
        for i, lora in enumerate(entry.job.loras):
            if lora.source != LIBRARY or lora.path is None:
                continue
            problem = library_problem(self.cfg.pool.lora_library, lora.file)
            if problem is None and lora.sha256 is not None:
                digest = self._sha256(self.library_hashes, lora.path, signature(lora.path.resolve()))
                if digest != lora.sha256:
                    problem = f"the file's sha256, but {lora.path} has {digest} (a different version of the LoRA?)"
            if problem:
                problems.append(str(ManifestError(f"lora[{i}].library", lora.file, problem)))
        return problems

    def _check_inputs(self, candidate: Candidate, entry: Staging) -> None:
        assert entry.job is not None
        wrong = self._library_problems(entry)
        if wrong:  # the library is the server's: nothing the uploader could still fix by waiting
            self.reject(entry.job_id, candidate, wrong)
            return
        problems = [p for item in entry.job.files().values() if (p := self._input_problem(entry, item))]
        entry.checked_at = time.monotonic()
        if entry.first_checked_at is None:
            entry.first_checked_at = entry.checked_at
        if problems:
            if "; ".join(problems) != entry.waiting:  # log and record a change once, not every tick
                jlog(logging.INFO, entry.job_id, "waiting: %s", "; ".join(problems))
                self.ledger.note_waiting(entry.job_id, "; ".join(problems))  # for status and show
            entry.waiting = "; ".join(problems)
            return
        self.accept(candidate, entry)

    def _files(self, candidate: Candidate, job: Job | None) -> JobFiles:
        inputs = tuple(item.path for item in job.files().values()) if job is not None else ()
        return JobFiles(self.paths.inbox, candidate.manifest, candidate.folder, inputs)

    def _shared_inputs(self, me: str, files: JobFiles) -> set[Path]:
        """Inputs that another manifest waiting in the inbox names too: copy them, do not take them away."""
        others = {
            item.path
            for key, entry in self.staging.items()
            if key != me and entry.job is not None
            for item in entry.job.files().values()
        }
        return {p for p in files.inputs if p in others}

    # --- accept or reject --------------------------------------------------------------------------------

    def accept(self, candidate: Candidate, entry: Staging) -> None:
        job = entry.job
        assert job is not None
        hashes = {key: entry.hashes[str(item.path)][1] for key, item in job.files().items()}
        for i, lora in enumerate(job.loras):
            if lora.source == LIBRARY and lora.path is not None:
                job = job.with_lora_sha256(i, self._sha256(self.library_hashes, lora.path, signature(lora.path.resolve())))
        lora_hashes = [lora.sha256 or hashes[f"lora[{i}]"] for i, lora in enumerate(job.loras)]
        content_hash = manifest_hash(candidate.manifest.read_bytes(), {r: hashes[r] for r in job.inputs}, lora_hashes)
        duplicate = self.ledger.find_duplicate(content_hash, exclude_id=entry.job_id)
        if duplicate is not None and duplicate.state in (S.FAILED, S.CANCELLED):
            duplicate = None  # an identical job that gave up or was cancelled: this one is a fresh try
        if duplicate is not None and self.cfg.inbox.dedupe == "skip":
            outputs = (duplicate.outputs_json or {}).get("video", "not delivered yet")
            why = (f"identical to job {duplicate.id} ({duplicate.state.value}), output {outputs}; "
                   "to run it again anyway, change the seed or set inbox.dedupe = \"run\"")
            self.reject(entry.job_id, candidate, [why], content_hash)
            return
        seed = job.seed if job.seed is not None else secrets.randbelow(SEED_LIMIT)
        taken = jobfiles.work_inputs_dir(self.paths.work, entry.job_id)
        files = self._files(candidate, job)
        # Recorded first: after a crash, recovery knows the daemon (not the user) took these files away.
        self.failures.intents.replace(entry.job_id, ACCEPT, {"taken": str(taken)})
        kill_point("accept.intent")
        try:
            jobfiles.take_into_work(files, taken, self._shared_inputs(str(candidate.manifest), files))
        except OSError as exc:
            if (reason := take_in_blocked(exc, self.paths.work, self.holds.retry_seconds)) is None:
                raise
            jobfiles.give_back(taken, self.paths.inbox, candidate.folder.name if candidate.folder else None)
            self.failures.intents.clear(entry.job_id, ACCEPT)
            self.holds.hold(entry.job_id, reason)  # staged, waiting for space, the upload in the inbox as it was
            entry.waiting = ""  # the ledger's reason is the hold's now: a new problem is recorded again
            return
        base = files.base()
        moved = {key: replace(item, path=taken / item.path.relative_to(base), sha256=hashes[key])
                 for key, item in job.files().items()}
        job = job.with_seed(seed).with_files(moved)
        accepted = self.ledger.transition(
            entry.job_id, S.STAGED, S.QUEUED,
            f"accepted: {len(job.files())} input(s) verified, seed {seed}"
            + (f", {len(job.loras)} LoRA(s)" if job.loras else ""),
            name=job.name, kind=job.kind, model_id=job.model_id, priority=job.priority,
            work_dir=str(taken.parent), params_json=job.to_dict(), input_hash=content_hash,
        )  # fmt: skip
        kill_point("accept.recorded")
        self.failures.intents.clear(entry.job_id, ACCEPT)
        self._forget(str(candidate.manifest), files)
        if not accepted:  # cancelled meanwhile: its files go to failed/ with the reason
            self.failures.move_inputs(entry.job_id, job.name, "it was cancelled before it was accepted")
            return
        jlog(logging.INFO, entry.job_id, "accepted %s (%s, %s), seed %d", job.name, job.kind, job.model_id, seed)

    def _forget(self, key: str, files: JobFiles) -> None:
        self.staging.pop(key, None)
        for path in (files.manifest, *files.inputs):
            self.tracker.forget(path)

    def reject(self, job_id: str, candidate: Candidate, errors: list[ManifestError | str],
               content_hash: str | None = None) -> None:
        """staged -> rejected: the manifest (and its inputs) to failed/<name>/ with error.txt."""
        entry = self.staging.get(str(candidate.manifest))
        job = entry.job if entry is not None else None
        name = job.name if job is not None else candidate.default_name
        files = self._files(candidate, job)
        shared = self._shared_inputs(str(candidate.manifest), files)
        text = render_errors(errors, candidate.key)
        if candidate.folder is not None:
            sources = [(candidate.folder, Path("."))]
        else:  # the inputs first, the manifest last: a crash between them leaves the job's reason findable
            keep = [p for p in files.inputs if p not in shared and signature(p) is not None]
            sources = [(p, p.relative_to(self.paths.inbox)) for p in keep]
            sources += [(files.manifest, Path(files.manifest.name))]
            if job is None and not os.path.isdir(files.manifest):
                text += "\nOnly the manifest was moved here; media files it may name stay in the inbox.\n"
        summary = "; ".join(str(e) for e in errors)
        fields: dict[str, Any] = {"last_error": summary, "error_kind": ErrorKind.INPUT.value}
        if content_hash:
            fields["input_hash"] = content_hash
        transition = {"message": f"rejected: {summary}", "fields": fields}
        try:
            dest = self.failures.reject_files(job_id, name, sources, text, transition)
        except OSError as exc:  # the intent stays: the retry finishes this very plan
            self.holds.hold(job_id, reject_blocked(exc, self.paths.failed, summary, self.holds.retry_seconds))
            return
        self.finish_reject(job_id, dest, transition)
        self._forget(str(candidate.manifest), files)
        jlog(logging.WARNING, job_id, "rejected (%s): %s -> %s", candidate.key, summary, dest)

    def finish_reject(self, job_id: str, dest: Path, transition: dict[str, Any]) -> None:
        """staged -> rejected as planned (also the redo after a crash), then the intent is done."""
        fields = {**transition["fields"], "outputs_json": {"failed_dir": str(dest)}}
        fields["error_kind"] = ErrorKind(fields["error_kind"])
        if self.ledger.transition(job_id, S.STAGED, S.REJECTED, transition["message"], **fields):
            kill_point("reject.recorded")
            self.failures.ended(job_id)
        self.failures.intents.clear(job_id, REJECT)

    def _clear_cancelled_staged(self, record: JobRecord, candidate: Candidate) -> None:
        text = render_errors([f"job {record.id} was cancelled (by `wanbox cancel`) before it was accepted"],
                             candidate.key)
        files = self._files(candidate, None)
        sources = ([(files.manifest, Path(files.manifest.name))] if candidate.folder is None
                   else [(candidate.folder, Path("."))])
        dest = self.failures.reject_files(record.id, record.name, sources, text)
        self.failures.intents.clear(record.id, REJECT)
        jlog(logging.INFO, record.id, "cancelled while staged: manifest moved to %s", dest)

    def _forget_vanished(self, seen: set[str]) -> None:
        """A staged manifest that left the inbox (removed by its owner): reject the job, saying so."""
        why = "the manifest was removed from the inbox before the job was accepted"
        for key, entry in list(self.staging.items()):
            if key not in seen:
                self.staging.pop(key)
                if self.ledger.transition(entry.job_id, S.STAGED, S.REJECTED, f"rejected: {why}",
                                          last_error=why, error_kind=ErrorKind.INPUT):
                    self.failures.ended(entry.job_id)

    def _reject_overdue(self) -> None:
        for record in self.ledger.staged_past_deadline():
            entry = next(((k, e) for k, e in self.staging.items() if e.job_id == record.id), None)
            if entry is None:
                continue  # seen again on the next scan, then checked (after a restart)
            key, staging = entry
            if self.holds.held(record.id) or not self._watched_settling(staging):
                continue  # e.g. restarted past the deadline: first see whether the files settle
            reason = staging.waiting or record.waiting_reason or "the manifest or its inputs did not settle"
            text = f"staging deadline of {self.cfg.inbox.staged_deadline_seconds:g} s passed: {reason}"
            manifest = Path(key)
            folder = manifest.parent if manifest.parent != self.paths.inbox else None
            rel = str(manifest.relative_to(self.paths.inbox))
            self.reject(record.id, Candidate(manifest, folder, rel), [text])

    def _watched_settling(self, staging: Staging) -> bool:
        """Whether the last look at a staged job's files came a full settle window after this daemon began
        watching them ("still changing" is only known then), or it has waited long enough regardless."""
        settle = self.cfg.inbox.settle_seconds
        first = staging.first_checked_at
        if first is not None and staging.checked_at - first >= settle:
            return True
        return time.monotonic() - staging.seen_at > 4 * settle + 10  # a manifest that never stops changing

