"""The supervisor (`wanbox serve`): inbox -> ledger -> CPU preprocessing -> warm pool -> outbox.

The one writer of job progress: it decides what watcher candidates and pool events mean for jobs.
It must never import torch, never crash on user input, and never delete an input that is the only copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import stat
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from daemon import jobfiles, protocol
from daemon.config import Config
from daemon.jobfiles import JobFiles
from daemon.ledger import Backoff, Ledger, LedgerError
from daemon.notify import Notifier
from daemon.outbox import Outbox, OutputInvalid
from daemon.pool import PoolEvent, WarmPool
from daemon.preprocessing import (
    PreprocessFailed,
    die_with,
    prepare_job,
    prepared_inputs,
    read_progress,
    warm_up,
)
from daemon.prune import prune_done
from daemon.states import JobState
from daemon.watcher import Candidate, InboxWatcher, StabilityTracker, check_inbox
from inbox_schema import ManifestError, ManifestInvalid, file_sha256, load_manifest, render_errors
from inbox_schema.defaults import MANIFEST_MAX_BYTES
from inbox_schema.hashing import manifest_hash

log = logging.getLogger("wanbox.supervisor")
PRUNE_EVERY_SECONDS = 3600.0
S = JobState
LOCK_FILE = "serve.lock"  # state/serve.lock: flock held by the running supervisor, with its pid
MAX_INTAKE_CRASHES = 5  # internal errors on one manifest before it is rejected instead of retried forever
SEED_LIMIT = 2**31  # a seed every backend accepts (torch.Generator takes 64 bits, numpy 32)


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this root."""


def jlog(level: int, job_id: str, text: str, *args: Any) -> None:
    """Every line about a job starts with its id and carries it as a field: under systemd
    `journalctl -u wanbox WANBOX_JOB=ID` (daemon/journal.py) or `journalctl | grep ID` tells its whole story."""
    log.log(level, f"job {job_id}: {text}", *args, extra={"job": job_id})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("wanbox")
    except Exception:  # not installed (a checkout): the version in pyproject
        return "0.1.0+checkout"


@dataclass
class Staging:
    """What the supervisor knows about a staged manifest between ticks (rebuilt after a restart)."""

    job_id: str
    signature: tuple[int, int]
    job: Any = None  # inbox_schema.Job when the manifest parsed
    waiting: str = ""  # why it is not accepted yet (the rejection reason at the deadline)
    hashes: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)  # path -> (sig, sha256)


def failed_text(job_id: str, name: str, why: str) -> str:
    """error.txt for a job that was accepted but could not be made into a video."""
    return (
        f"wanbox could not make the video for job {job_id} ({name}):\n\n  * {why}\n\n"
        "The job's original files are in this folder; nothing was deleted.\n"
        f"To run it again unchanged (e.g. after fixing the installation): wanbox retry {job_id}\n"
        "  (retry takes the files back from this folder).\n"
        "To change it: fix the manifest and submit it again (`wanbox submit FILE`, or copy the media into\n"
        "the inbox first and the manifest last).\n"
    )


def _file_kind(path: Path) -> str:
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


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class Supervisor:
    """Owns the loop; `serve()` runs until SIGTERM/SIGINT, then stops gracefully."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.paths = config.paths
        self.stopping = threading.Event()
        self.ledger: Ledger | None = None
        self.watcher = InboxWatcher(self.paths.inbox, config.inbox.rescan_seconds, config.inbox.polling)
        self.tracker = StabilityTracker(config.inbox.settle_seconds)
        self.pool = WarmPool(config.pool, self.paths.socket, config.outbox.crf)
        self.outbox = Outbox(self.paths.outbox, config.outbox.poster)
        self.notifier = Notifier()
        self.staging: dict[str, Staging] = {}  # manifest path -> what we know
        self.preparing: dict[str, tuple[Future[dict[str, Any]], float]] = {}
        self.executor: ProcessPoolExecutor | None = None
        self.cancel_sent: str | None = None
        self.run_started: dict[str, float] = {}
        self._reported: set[str] = set()  # problems logged once, not every tick
        self._last_prep_progress: dict[str, dict[str, Any]] = {}
        self._prep_moved: dict[str, float] = {}  # job -> when its preparation last reported progress
        self._pruned_at = -PRUNE_EVERY_SECONDS  # monotonic time of the last prune: the first tick prunes
        self._crashes: dict[str, int] = {}  # manifest -> internal errors while looking at it
        self._lock_file: Any = None

    # --- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        for path in self.cfg.all_dirs:
            path.mkdir(parents=True, exist_ok=True)
        self._lock_root()
        backoff = Backoff(self.cfg.jobs.backoff_base_seconds, self.cfg.jobs.backoff_cap_seconds)
        self.ledger = Ledger.open(self.paths.ledger, backoff=backoff)
        self.recover()
        # spawn, not fork: this process has threads (watcher, pool reader) that fork would copy mid-state.
        self.executor = self._new_executor()
        self.pool.open()
        self.watcher.start()
        log.info("wanbox %s serving %s (inbox %s, outbox %s)", software_version(), self.paths.root,
                 self.paths.inbox, self.paths.outbox)
        if self.cfg.pool.preload:
            # READY=1 once the pool is warm (or has failed to start, which STATUS then explains).
            for event in self.pool.launch(self.cfg.pool.preload):
                self.on_pool_event(event)
            self.report_status()
        else:
            self.notifier.ready()  # the pool loads on demand, per model: we can take jobs now

    def _lock_root(self) -> None:
        """One supervisor per root: a second one would take the same jobs and replace the pool's socket."""
        self._lock_file = open(self.paths.state / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise AlreadyRunning(
                f"another `wanbox serve` (pid {holder}) is running on {self.paths.root}; stop it first "
                "(systemctl stop wanbox), or use another --root"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current step, taking no new work", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve(self) -> int:
        self.start()
        try:
            while not self.stopping.is_set():
                self.tick()
        finally:
            self.shutdown()
        return 0

    def tick(self) -> None:
        """One turn of the loop; an unexpected error is logged and the loop goes on (no watchdog ping)."""
        try:
            for event in self.pool.poll(timeout=self.cfg.jobs.tick_seconds):
                self.on_pool_event(event)
            self.intake()
            self.collect_preprocessing()
            self.check_cancellations()
            self.start_preprocessing()
            self.dispatch()
            self.prune_work()
            self.report_status()
            self.notifier.healthy()
        except Exception:
            log.exception("supervisor loop error (continuing)")
            time.sleep(self.cfg.jobs.tick_seconds)

    def prune_work(self) -> None:
        """Once an hour, with [jobs] prune_after_days set: delete the work folders of long-delivered jobs."""
        days = self.cfg.jobs.prune_after_days
        if days <= 0 or time.monotonic() - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = time.monotonic()
        for gone in prune_done(self.ledger, self.paths.work, timedelta(days=days)):
            jlog(logging.INFO, gone.job_id, "work folder pruned (%.1f MiB; delivered over %g days ago)",
                 gone.bytes / 2**20, days)  # fmt: skip

    def shutdown(self) -> None:
        """No new work; the running job finishes its step (or is requeued); the ledger stays consistent."""
        self.notifier.stopping()
        self.watcher.stop()
        self._stop_pool("the daemon is stopping")
        self._stop_preprocessing()
        self.pool.close()
        if self.ledger is not None:
            self.ledger.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the root for the next supervisor
            self._lock_file = None
        log.info("stopped")

    def _stop_pool(self, why: str) -> None:
        job = self.pool.job
        if self.pool.state in ("busy", "idle", "loading") and self.pool.pid is not None:
            self.pool.request_shutdown()
            deadline = time.monotonic() + self.cfg.pool.stop_grace_seconds
            # Keep listening: the step in progress may still finish the job, which we then deliver.
            while self.pool.job is not None and time.monotonic() < deadline:
                for event in self.pool.poll(timeout=0.2):
                    if event.kind in ("done", "error"):
                        self.on_pool_event(event)
                    elif event.kind == "died":
                        break
                if self.pool.state == "stopped":
                    break
        self.pool.stop(grace=max(1.0, self.cfg.pool.stop_grace_seconds / 4))
        if job is not None and self.ledger.get(job).state == S.SAMPLING:
            self.ledger.transition(job, S.SAMPLING, S.READY, f"requeued: {why}")
            jlog(logging.INFO, job, "requeued (%s)", why)

    def _stop_preprocessing(self) -> None:
        if self.executor is None:
            return
        deadline = time.monotonic() + min(30.0, self.cfg.pool.stop_grace_seconds)
        while self.preparing and time.monotonic() < deadline:
            self.collect_preprocessing()
            time.sleep(0.1)
        for job_id in list(self.preparing):
            self.ledger.transition(job_id, S.PREPROCESSING, S.QUEUED, "requeued: the daemon is stopping")
        self._kill_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn, not fork: this process has threads (watcher, pool reader) that fork would copy mid-state.
        executor = ProcessPoolExecutor(self.cfg.preprocess.workers, mp_context=get_context("spawn"),
                                       initializer=die_with, initargs=(os.getpid(),))
        executor.submit(warm_up)  # start the processes now, not when the first job is waiting
        return executor

    def _kill_executor(self) -> None:
        """Shut the CPU pool down without waiting: a stuck preparation must not hold anything up."""
        assert self.executor is not None
        processes = list(getattr(self.executor, "_processes", {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.kill()

    # --- recovery ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """After a crash: running jobs back in line, and files in work/ consistent with the ledger."""
        moved = self.ledger.recover_interrupted(
            has_prepared_inputs=lambda job: prepared_inputs(Path(job.work_dir or "/nonexistent")) is not None
        )
        for job_id, frm, to in moved:
            jlog(logging.WARNING, job_id, "recovered after an interruption: %s -> %s", frm, to)
        try:
            check_inbox(self.paths.inbox)
        except OSError as exc:
            log.error("INBOX OUTAGE at start-up: %s; staged jobs keep waiting", exc)
            return
        for job in self.ledger.list(states=[S.STAGED], limit=None):
            self._recover_staged(job)

    def _recover_staged(self, job: Any) -> None:
        """A staged job interrupted while its files were moved to work/: put them back in the inbox."""
        taken = jobfiles.work_inputs_dir(self.paths.work, job.id)
        if not taken.exists():
            if not os.path.lexists(job.manifest_path):
                why = "the manifest was removed from the inbox (while the daemon was stopped) before it was accepted"
                self.ledger.transition(job.id, S.STAGED, S.REJECTED, f"rejected: {why}", last_error=why,
                                       error_kind="input")
                jlog(logging.WARNING, job.id, "rejected: %s", why)
            return
        manifest = Path(job.manifest_path)
        folder = manifest.parent.name if manifest.name == "job.toml" and manifest.parent != self.paths.inbox else None
        stayed = jobfiles.return_to_inbox(taken, self.paths.inbox, folder)
        jlog(logging.WARNING, job.id, "an interrupted intake was undone: files returned to the inbox%s",
             f" (kept in {taken}: names taken again: {stayed})" if stayed else "")

    # --- intake: inbox -> staged -> queued | rejected -------------------------------------------------

    def intake(self) -> None:
        if self.stopping.is_set():
            return
        if not (self.watcher.due() or self.staging):
            return
        candidates = self.watcher.scan()
        if candidates is None:
            return  # outage: nothing is read as deleted
        seen = set()
        for candidate in candidates:
            seen.add(str(candidate.manifest))
            try:
                self.consider(candidate)
            except Exception as exc:  # user input must never take the daemon down
                self._intake_crashed(candidate, exc)
        self._forget_vanished(seen)
        self._reject_overdue()

    def _intake_crashed(self, candidate: Candidate, exc: Exception) -> None:
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
                entry = self._stage(candidate, _signature(candidate.manifest))
            if entry is not None:
                self.reject(entry.job_id, candidate, [why])
        except Exception:
            log.exception("could not reject %s after repeated internal errors", candidate.manifest)

    def consider(self, candidate: Candidate) -> None:
        manifest = candidate.manifest
        key = str(manifest)
        kind = _file_kind(manifest)
        if kind != "file":
            # Never open it: a symlink may lead out of the inbox, a FIFO would block the daemon forever.
            expected = "a regular file" + (", not a symbolic link" if kind == "symlink" else f", not a {kind}")
            self._reject_new(candidate, [ManifestError("manifest", candidate.key, expected)])
            return
        if not self.tracker.is_stable(manifest):
            return  # still being written
        signature = _signature(manifest)
        if signature is not None and signature[0] > MANIFEST_MAX_BYTES:  # do not even read it
            self._reject_new(candidate, [ManifestError("manifest", f"{signature[0]} bytes",
                                                       f"a manifest of at most {MANIFEST_MAX_BYTES} bytes")])
            return
        entry = self.staging.get(key)
        if entry is not None and self._left_staging(entry, candidate):
            return
        if entry is None:
            entry = self._stage(candidate, signature)
            if entry is None:
                return
        if entry.signature != signature or entry.job is None:
            entry.signature = signature
            try:
                entry.job = load_manifest(manifest, self.paths.inbox)
            except ManifestInvalid as exc:
                self.reject(entry.job_id, candidate, exc.errors)
                return
        self._check_inputs(candidate, entry)

    def _left_staging(self, entry: Staging, candidate: Candidate) -> bool:
        """A person cancelled the staged job (`wanbox cancel`): its manifest leaves the inbox for failed/."""
        job = self.ledger.get(entry.job_id)
        if job.state == S.STAGED:
            return False
        self._forget(str(candidate.manifest), self._files(candidate, None))
        if job.state == S.CANCELLED:
            self._clear_cancelled_staged(job, candidate)
        return True

    def _stage(self, candidate: Candidate, signature: tuple[int, int] | None) -> Staging | None:
        """The ledger's staged job for this manifest (after a restart) or a new one."""
        known = self.ledger.find_by_manifest(candidate.manifest)
        if known is None:
            ended = self.ledger.find_by_manifest(candidate.manifest, states=[S.CANCELLED])
            if ended is not None and ended.work_dir is None:
                self._clear_cancelled_staged(ended, candidate)
                return None
            deadline = utcnow() + timedelta(seconds=self.cfg.inbox.staged_deadline_seconds)
            known = self.ledger.add_staged(
                candidate.default_name, "unknown", candidate.manifest, deadline,
                max_attempts=self.cfg.jobs.max_attempts, message=f"manifest {candidate.key} found in the inbox",
            )
            jlog(logging.INFO, known.id, "staged from %s", candidate.key)
        entry = Staging(known.id, signature or (0, 0))
        self.staging[str(candidate.manifest)] = entry
        return entry

    def _reject_new(self, candidate: Candidate, errors: list[ManifestError]) -> None:
        entry = self.staging.get(str(candidate.manifest)) or self._stage(candidate, None)
        if entry is not None:
            self.reject(entry.job_id, candidate, errors)

    def _input_problem(self, entry: Staging, item: Any) -> str | None:
        """Why this input is not ready yet, or None when present, stable and as declared."""
        field_name = f"inputs.{item.role}"
        sig = _signature(item.path)
        if sig is None:
            return f"{field_name} = {item.relpath!r}: the file is not in the inbox (yet)"
        if _file_kind(item.path) != "file":  # replaced by a link or special file after validation
            return f"{field_name} = {item.relpath!r}: expected a regular file, found a {_file_kind(item.path)}"
        if not self.tracker.is_stable(item.path):
            return f"{field_name} = {item.relpath!r}: the file is still changing (upload in progress?)"
        if item.size is not None and sig[0] != item.size:
            return f"{field_name}.size: the file has {sig[0]} bytes, expected {item.size} (as declared)"
        cached = entry.hashes.get(str(item.path))
        if cached is None or cached[0] != sig:
            cached = (sig, file_sha256(item.path))
            entry.hashes[str(item.path)] = cached
        if item.sha256 is not None and cached[1] != item.sha256:
            return f"{field_name}.sha256: the file's sha256 is {cached[1]}, expected {item.sha256} (as declared)"
        return None

    def _check_inputs(self, candidate: Candidate, entry: Staging) -> None:
        problems = [p for item in entry.job.inputs.values() if (p := self._input_problem(entry, item))]
        if problems:
            if problems[0] != entry.waiting:
                jlog(logging.INFO, entry.job_id, "waiting: %s", "; ".join(problems))
            entry.waiting = "; ".join(problems)
            return
        self.accept(candidate, entry)

    def _files(self, candidate: Candidate, job: Any | None) -> JobFiles:
        inputs = tuple(item.path for item in job.inputs.values()) if job is not None else ()
        return JobFiles(self.paths.inbox, candidate.manifest, candidate.folder, inputs)

    def _shared_inputs(self, me: str, files: JobFiles) -> set[Path]:
        """Inputs that another manifest waiting in the inbox names too: copy them, do not take them away."""
        others = {
            item.path
            for key, entry in self.staging.items()
            if key != me and entry.job is not None
            for item in entry.job.inputs.values()
        }
        return {p for p in files.inputs if p in others}

    def accept(self, candidate: Candidate, entry: Staging) -> None:
        job = entry.job
        hashes = {role: entry.hashes[str(item.path)][1] for role, item in job.inputs.items()}
        content_hash = manifest_hash(candidate.manifest.read_bytes(), hashes)
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
        job = job.with_seed(seed)
        taken = jobfiles.work_inputs_dir(self.paths.work, entry.job_id)
        files = self._files(candidate, job)
        jobfiles.take_into_work(files, taken, self._shared_inputs(str(candidate.manifest), files))
        params = job.to_dict()
        base = files.base()
        for role, item in job.inputs.items():
            params["inputs"][role]["path"] = str(taken / item.path.relative_to(base))
            params["inputs"][role]["sha256"] = hashes[role]
        moved = self.ledger.transition(
            entry.job_id, S.STAGED, S.QUEUED,
            f"accepted: {len(job.inputs)} input(s) verified, seed {seed}",
            name=job.name, kind=job.kind, model_id=job.model_id, priority=job.priority,
            work_dir=str(taken.parent), params_json=params, input_hash=content_hash,
        )  # fmt: skip
        self._forget(str(candidate.manifest), files)
        if not moved:  # cancelled meanwhile: its files go to failed/ with the reason
            self._to_failed_from_work(entry.job_id, job.name, "it was cancelled before it was accepted")
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
        else:
            keep = [p for p in files.inputs if p not in shared and _signature(p) is not None]
            sources = [(files.manifest, Path(files.manifest.name))]
            sources += [(p, p.relative_to(self.paths.inbox)) for p in keep]
            if job is None:
                text += "\nOnly the manifest was moved here; media files it may name stay in the inbox.\n"
        dest = self._failed_dir_with(name, sources, text)
        summary = "; ".join(str(e) for e in errors)
        fields = {"last_error": summary, "error_kind": "input", "outputs_json": {"failed_dir": str(dest)}}
        if content_hash:
            fields["input_hash"] = content_hash
        self.ledger.transition(job_id, S.STAGED, S.REJECTED, f"rejected: {summary}", **fields)
        self._forget(str(candidate.manifest), files)
        jlog(logging.WARNING, job_id, "rejected (%s): %s -> %s", candidate.key, summary, dest)

    def _failed_dir_with(self, name: str, sources: list[tuple[Path, Path]], text: str) -> Path:
        if len(sources) == 1 and sources[0][1] == Path("."):
            # Folder layout: the whole folder becomes failed/<name>/, then error.txt is added.
            dest = jobfiles.free_dir(self.paths.failed, name)
            jobfiles.move_file(sources[0][0], dest)
            jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, text)
            return dest
        return jobfiles.to_failed(self.paths.failed, name, sources, text)

    def _clear_cancelled_staged(self, job: Any, candidate: Candidate) -> None:
        text = render_errors([f"job {job.id} was cancelled (by `wanbox cancel`) before it was accepted"],
                             candidate.key)
        files = self._files(candidate, None)
        dest = self._failed_dir_with(job.name, [(files.manifest, Path(files.manifest.name))]
                                     if candidate.folder is None else [(candidate.folder, Path("."))], text)
        jlog(logging.INFO, job.id, "cancelled while staged: manifest moved to %s", dest)

    def _forget_vanished(self, seen: set[str]) -> None:
        """A staged manifest that left the inbox (removed by its owner): reject the job, saying so."""
        for key, entry in list(self.staging.items()):
            if key not in seen:
                self.staging.pop(key)
                self.ledger.transition(
                    entry.job_id, S.STAGED, S.REJECTED,
                    "rejected: the manifest was removed from the inbox before the job was accepted",
                    last_error="the manifest was removed from the inbox before the job was accepted",
                    error_kind="input",
                )  # fmt: skip

    def _reject_overdue(self) -> None:
        for job in self.ledger.staged_past_deadline():
            entry = next(((k, e) for k, e in self.staging.items() if e.job_id == job.id), None)
            if entry is None:
                continue  # seen again on the next scan, then checked (after a restart)
            key, staging = entry
            reason = staging.waiting or "the manifest or its inputs did not settle"
            text = (f"staging deadline of {self.cfg.inbox.staged_deadline_seconds:g} s passed: {reason}")
            manifest = Path(key)
            folder = manifest.parent if manifest.parent != self.paths.inbox else None
            rel = str(manifest.relative_to(self.paths.inbox))
            self.reject(job.id, Candidate(manifest, folder, rel), [text])

    # --- preprocessing: queued -> preprocessing -> ready ------------------------------------------------

    def start_preprocessing(self) -> None:
        while not self.stopping.is_set() and len(self.preparing) < self.cfg.preprocess.workers:
            job = self.ledger.claim_next(S.QUEUED, S.PREPROCESSING, message="preprocessing on the CPU")
            if job is None:
                return
            if not self._inputs_in_work(job):
                continue
            prep = self.cfg.preprocess
            future = self.executor.submit(prepare_job, job.kind, job.params_json, job.work_dir,
                                          str(prep.mediapipe_dir), prep.pose_model, prep.max_area)
            self.preparing[job.id] = (future, time.monotonic())
            self.ledger.record_progress(job.id, "preprocess", None, None)
            jlog(logging.INFO, job.id, "preprocessing")

    def _inputs_in_work(self, job: Any) -> bool:
        """A retried job's inputs may sit in failed/<name>/: bring them back; fail if they are gone."""
        taken = jobfiles.work_inputs_dir(self.paths.work, job.id)
        pointer = taken.parent / jobfiles.FAILED_POINTER
        failed_dir = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if not taken.exists() and failed_dir and Path(failed_dir).is_dir():
            jobfiles.move_file(Path(failed_dir), taken)
            pointer.unlink()
            jlog(logging.INFO, job.id, "inputs taken back from %s for the retry", failed_dir)
        missing = [r for r, item in job.params_json["inputs"].items() if not os.path.isfile(item["path"])]
        if missing:
            why = f"its input files are gone from {taken} ({', '.join(missing)}): submit it again"
            self.ledger.transition(job.id, S.PREPROCESSING, S.FAILED, f"failed: {why}", last_error=why,
                                   error_kind="input")
            jlog(logging.ERROR, job.id, "failed: %s", why)
            return False
        return True

    def collect_preprocessing(self) -> None:
        stuck = []
        for job_id, (future, started) in list(self.preparing.items()):
            if not future.done():
                self._preprocess_progress(job_id)
                stall = self.cfg.preprocess.stall_seconds
                if stall > 0 and time.monotonic() - self._prep_moved.get(job_id, started) > stall:
                    stuck.append(job_id)
                continue
            self._end_preparation(job_id)
            seconds = time.monotonic() - started
            try:
                record = future.result()
            except PreprocessFailed as exc:
                self._failed(job_id, S.PREPROCESSING, str(exc), exc.kind, exc.retryable)
                continue
            except Exception as exc:  # the pool process died (killed, out of memory)
                self._failed(job_id, S.PREPROCESSING, f"preprocessing process died: {exc!r}", "internal", True)
                continue
            self.ledger.record_timing(job_id, "preprocess", seconds)
            if self.ledger.transition(job_id, S.PREPROCESSING, S.READY, f"prepared in {seconds:.1f} s"):
                jlog(logging.INFO, job_id, "ready for the GPU pool (prepared in %.1f s)", seconds)
            else:
                jlog(logging.INFO, job_id, "prepared, but it was cancelled meanwhile")
            del record
        if stuck:
            self._restart_preprocessing(stuck)

    def _restart_preprocessing(self, stuck: list[str]) -> None:
        """Preparations with no progress for stall_seconds: which pool process runs which job cannot be told,
        so the whole CPU pool is replaced; the stuck jobs fail this attempt (retried with backoff), the others
        go back in line untouched."""
        stall = self.cfg.preprocess.stall_seconds
        for job_id in list(self.preparing):
            last = self._end_preparation(job_id)
            if job_id not in stuck:
                self.ledger.transition(job_id, S.PREPROCESSING, S.QUEUED, "requeued: the CPU pool was restarted")
                continue
            where = f" (last progress: {last['phase']} {last['step']}/{last['total']})" if last else ""
            self._failed(job_id, S.PREPROCESSING, f"preprocessing made no progress for {stall:g} s{where}; its "
                         "process was killed ([preprocess] stall_seconds)", "internal", True)  # fmt: skip
        log.error("preprocessing: %d stuck preparation(s); restarting the CPU pool", len(stuck))
        self._kill_executor()
        self.executor = self._new_executor()

    def _end_preparation(self, job_id: str) -> dict[str, Any] | None:
        """Forget a finished or abandoned preparation's bookkeeping; its last progress report, if any."""
        del self.preparing[job_id]
        self._prep_moved.pop(job_id, None)
        return self._last_prep_progress.pop(job_id, None)

    def _preprocess_progress(self, job_id: str) -> None:
        progress = read_progress(self.paths.work / job_id)
        if progress and progress != self._last_prep_progress.get(job_id):
            self._last_prep_progress[job_id] = progress
            self._prep_moved[job_id] = time.monotonic()  # progress: not stuck
            self.ledger.record_progress(job_id, f"preprocess:{progress['phase']}", progress["step"],
                                        progress["total"])

    def _failed(self, job_id: str, frm: JobState, error: str, kind: str, retryable: bool) -> None:
        to = self.ledger.record_failure(job_id, frm, error, kind, retryable)
        if to is None:
            return
        jlog(logging.ERROR if to == S.FAILED else logging.WARNING, job_id, "%s (%s): %s -> %s", kind,
             "retryable" if retryable else "permanent", error, to)
        if to == S.FAILED:
            job = self.ledger.get(job_id)
            self._to_failed_from_work(job_id, job.name, job.last_error or error)

    def _to_failed_from_work(self, job_id: str, name: str, why: str) -> None:
        """A failed job's original files go to failed/<name>/ with error.txt; `retry` brings them back."""
        taken = jobfiles.work_inputs_dir(self.paths.work, job_id)
        if not taken.exists():
            return
        text = failed_text(job_id, name, why)
        dest = jobfiles.free_dir(self.paths.failed, name)
        jobfiles.move_file(taken, dest)
        jobfiles.write_text_durably(dest / jobfiles.ERROR_FILE, text)
        # Remembered beside the job's work files, so that `wanbox retry` can bring them back.
        jobfiles.write_text_durably(taken.parent / jobfiles.FAILED_POINTER, str(dest))
        jlog(logging.INFO, job_id, "inputs moved to %s", dest)

    # --- the warm pool: ready -> sampling -> finalizing -> done -----------------------------------------

    def check_cancellations(self) -> None:
        job_id = self.pool.job
        if job_id is None or self.cancel_sent == job_id:
            return
        if self.ledger.get(job_id).state == S.CANCELLED:
            jlog(logging.INFO, job_id, "cancelled: telling the pool to stop at the next step")
            self.pool.cancel(job_id)
            self.cancel_sent = job_id

    def dispatch(self) -> None:
        if self.stopping.is_set() or self.pool.state in ("busy", "loading"):
            return
        idle = self.pool.state == "idle"
        turn = {"model_id": self.pool.model if idle else None, "now": utcnow(),
                "max_wait": timedelta(seconds=self.cfg.pool.max_switch_wait_seconds),
                "loaded_since": self.pool.ready_at if idle else None, "fresh": idle and self.pool.jobs_run == 0}
        job = self.ledger.peek_next(S.READY, **turn)  # the ledger's rule: ledger.next_query
        if job is None:
            return
        if self.pool.state == "idle" and self.pool.model == job.model_id:
            self._run(turn)
            return
        if self.pool.state == "idle":
            jlog(logging.INFO, job.id, "switching the pool from %s to %s", self.pool.model, job.model_id)
            self.pool.stop()
        if self.pool.can_launch():
            for event in self.pool.launch(job.model_id):
                self.on_pool_event(event)

    def _run(self, turn: dict[str, Any]) -> None:
        job = self.ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model=self.pool.model,
                                     message=f"sent to the {self.pool.model} pool")
        if job is None:
            return  # the queue changed since the peek (a cancel, another host): the next tick looks again
        inputs = prepared_inputs(Path(job.work_dir))
        if inputs is None:
            self.ledger.transition(job.id, S.SAMPLING, S.QUEUED, "its prepared inputs are gone: prepare again")
            return
        output = Path(job.work_dir) / jobfiles.OUTPUT_FILE
        output.unlink(missing_ok=True)  # a stale file from an interrupted attempt must not be delivered
        run = protocol.Run(job=job.id, kind=job.kind, params=job.params_json, inputs=inputs,
                           output=str(output), crf=self.cfg.outbox.crf)
        self.cancel_sent = None
        self.run_started[job.id] = time.monotonic()
        jlog(logging.INFO, job.id, "sampling on the %s pool", self.pool.model)
        if not self.pool.run(run):
            for event in self.pool._died("could not send the job to the worker pool"):
                self.on_pool_event(event)

    def on_pool_event(self, event: PoolEvent) -> None:
        if event.kind == "progress":
            msg = event.message
            self.ledger.record_progress(event.job, msg["phase"], msg["step"], msg["total"])
        elif event.kind == "done":
            self.finalize(event.job, event.message)
        elif event.kind == "error":
            self._worker_error(event.job, event.message)
        elif event.kind == "died":
            self._pool_died(event)
        elif event.kind == "ready":
            log.info("pool %s warm (load %.1f s)", self.pool.model, self.pool.load_seconds or 0)
            self.notifier.ready()

    def _worker_error(self, job_id: str, msg: dict[str, Any]) -> None:
        self.run_started.pop(job_id, None)
        state = self.ledger.get(job_id).state
        if msg["kind"] == "cancelled" or state != S.SAMPLING:
            if state == S.SAMPLING:  # the worker stopped on its own (shutdown): run it again later
                self.ledger.transition(job_id, S.SAMPLING, S.READY, f"requeued: {msg['message']}")
            jlog(logging.INFO, job_id, "the pool stopped it: %s", msg["message"])
            return
        self._failed(job_id, S.SAMPLING, msg["message"], msg["kind"], bool(msg["retryable"]))

    def _pool_died(self, event: PoolEvent) -> None:
        if not self.notifier.ready_sent:  # the preload failed: start anyway, STATUS says why
            self.notifier.status(f"pool failed to start: {event.reason}")
            self.notifier.ready()
        if event.job is not None:
            self.run_started.pop(event.job, None)
            if self.ledger.get(event.job).state == S.SAMPLING:
                self._failed(event.job, S.SAMPLING, event.reason, "pool", True)
            return
        # Died while loading: after max_attempts launches in a row, the model cannot run here.
        if self.pool.failures >= self.cfg.jobs.max_attempts and self.pool.model is not None:
            self._fail_model(self.pool.model, event.reason)
            self.pool.failures = 0

    def _fail_model(self, model: str, reason: str) -> None:
        why = (f"the {model} pool failed to start {self.cfg.jobs.max_attempts} times in a row: {reason}. "
               f"Check `wanbox doctor` and `wanbox models verify` (checkpoints in "
               f"{self.cfg.pool.checkpoint_dir(model)}), then `wanbox retry JOB`")
        for job in self.ledger.list(states=[S.READY], limit=None):
            if job.model_id == model and self.ledger.transition(job.id, S.READY, S.FAILED, f"failed: {why}",
                                                                 last_error=why, error_kind="pool"):
                jlog(logging.ERROR, job.id, "failed: %s", why)
                self._to_failed_from_work(job.id, job.name, why)

    def finalize(self, job_id: str, msg: dict[str, Any]) -> None:
        started = self.run_started.pop(job_id, None)
        stats = msg.get("stats") or {}
        gpu_seconds = stats.get("gpu_seconds")
        fields: dict[str, Any] = {}
        if isinstance(gpu_seconds, (int, float)):
            fields["gpu_seconds"] = float(gpu_seconds)
        if not self.ledger.transition(job_id, S.SAMPLING, S.FINALIZING, "the worker reported done", **fields):
            jlog(logging.INFO, job_id, "output ignored: the job was cancelled meanwhile")
            return
        if started is not None:
            self.ledger.record_timing(job_id, "sampling_wall", time.monotonic() - started)
        for phase, seconds in (stats.get("phases") or {}).items():
            if isinstance(seconds, (int, float)):
                self.ledger.record_timing(job_id, phase, float(seconds))
        job = self.ledger.get(job_id)
        video = Path(msg["output"])
        try:
            outputs = self.outbox.deliver(video, job.name, self.sidecar(job, stats), self.extra_outputs(job))
        except (OutputInvalid, OSError) as exc:
            self._failed(job_id, S.FINALIZING, f"delivery failed: {exc}", "output", True)
            return
        outputs = {**(job.outputs_json or {}), **outputs}
        self.ledger.transition(job_id, S.FINALIZING, S.DONE, f"delivered {outputs['video']}", outputs_json=outputs)
        video.unlink(missing_ok=True)  # a copy is in the outbox now; the originals stay in work/<id>/inbox
        jlog(logging.INFO, job_id, "done: %s", outputs["video"])

    @staticmethod
    def extra_outputs(job: Any) -> dict[str, Path]:
        """Files delivered beside the video: the Animate overlay preview (the extracted pose and face box over
        the driving frames), so a person can see at a glance what the model was given."""
        preview = Path(job.work_dir) / "animate" / "preview.mp4"
        return {"preview": preview} if job.kind == "animate" and preview.is_file() else {}

    def sidecar(self, job: Any, stats: dict[str, Any]) -> dict[str, Any]:
        params = job.params_json or {}
        return {
            "job_id": job.id,
            "name": job.name,
            "kind": job.kind,
            "model_id": job.model_id,
            "seed": (params.get("sampling") or {}).get("seed"),
            "parameters": params,
            "inputs": {r: {k: v for k, v in i.items() if k != "path"} for r, i in params.get("inputs", {}).items()},
            "checkpoint_dir": str(self.cfg.pool.checkpoint_dir(job.model_id)),
            "checkpoints": stats.get("checkpoints", "unknown (the worker did not report hashes)"),
            "timings_seconds": job.timings_json or {},
            "gpu_seconds": job.gpu_seconds,
            "peak_memory": stats.get("peak_memory"),
            "model_load": stats.get("model_load"),
            "attention": stats.get("attention"),
            "pool": {k: self.pool.hello.get(k) for k in ("world_size", "devices", "parallel")},
            "attempts": job.attempts + 1,
            "created_at": job.created_at.isoformat(),
            "finished_at": utcnow().isoformat(),
            "software": {"wanbox": software_version()},
        }

    # --- status ----------------------------------------------------------------------------------------

    def report_status(self) -> None:
        pool = self.pool
        if pool.job is not None:
            p = pool.last_progress
            text = f"{pool.model}: job {pool.job} {p.get('phase', 'starting')} {p.get('step', 0)}/{p.get('total', '?')}"
            started = self.run_started.get(pool.job)
            if p.get("phase") == "sampling" and p.get("step") and started is not None:
                left = (time.monotonic() - started) / p["step"] * (p["total"] - p["step"])
                text += f", ETA {left:.0f} s"
        elif pool.state == "loading":
            text = f"loading {pool.model}"
        else:
            text = f"idle ({pool.state}); preparing {len(self.preparing)}; staged {len(self.staging)}"
        if self.watcher.outage:
            text = f"INBOX OUTAGE ({self.watcher.outage}); {text}"
        self.notifier.status(text)


def serve(config: Config) -> int:
    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()
    try:
        return supervisor.serve()
    except LedgerError as exc:
        log.error("cannot use the ledger: %s", exc)
        return 1
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
