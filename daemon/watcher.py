"""The inbox watcher: finds job manifests (watchdog events + rescans) and tells when files have settled.

It only REPORTS candidates and file stability; it must not parse manifests, move, open or delete
anything in the inbox (the supervisor decides), and it never reads a missing inbox as deletions.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("wanbox.watcher")

FOLDER_MANIFEST = "job.toml"
# Names that uploaders use while a transfer is in progress, and OS clutter: never ours to touch.
TEMPORARY_PATTERNS = ("*.part", "*.filepart", "*.tmp", "*~", "*.crdownload", "*.partial")
CLUTTER_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX", "lost+found", ".~tmp~"})


class InboxOutage(OSError):
    """The inbox is not there (unmounted share, removed directory): wait for it, delete nothing."""


def is_temporary(name: str) -> bool:
    """True for names an uploader is still writing (rsync dotfiles, *.part, ...) or OS clutter."""
    if name.startswith(".") or name in CLUTTER_NAMES:
        return True
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in TEMPORARY_PATTERNS)


def has_temporary_part(relpath: str) -> bool:
    return any(is_temporary(part) for part in Path(relpath).parts)


@dataclass(frozen=True)
class Candidate:
    """A manifest found in the inbox: `inbox/<name>.toml` (folder None) or `inbox/<name>/job.toml`."""

    manifest: Path
    folder: Path | None
    key: str  # the manifest's path relative to the inbox: identifies it across scans

    @property
    def default_name(self) -> str:
        return self.folder.name if self.folder is not None else self.manifest.stem


def check_inbox(inbox: Path) -> None:
    """Raise InboxOutage unless the inbox is an existing, listable directory."""
    try:
        mode = os.stat(inbox).st_mode
    except OSError as exc:
        raise InboxOutage(f"inbox {inbox} is not reachable: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise InboxOutage(f"inbox {inbox} is not a directory")


def scan_inbox(inbox: Path) -> list[Candidate]:
    """Every manifest in the inbox, in name order; temporary names and other files are skipped."""
    check_inbox(inbox)
    try:
        entries = sorted(os.scandir(inbox), key=lambda e: e.name)
    except OSError as exc:
        raise InboxOutage(f"inbox {inbox} cannot be listed: {exc.strerror}") from None
    found = []
    for entry in entries:
        if is_temporary(entry.name):
            continue
        if entry.name.endswith(".toml") and not entry.is_dir(follow_symlinks=False):
            found.append(Candidate(Path(entry.path), None, entry.name))
        elif entry.is_dir(follow_symlinks=False):
            manifest = Path(entry.path) / FOLDER_MANIFEST
            if os.path.lexists(manifest):
                found.append(Candidate(manifest, Path(entry.path), f"{entry.name}/{FOLDER_MANIFEST}"))
        elif entry.is_symlink() and _leads_to_folder(entry):
            # A linked job folder is never followed, but reported: intake rejects it with the reason.
            found.append(Candidate(Path(entry.path), None, entry.name))
    return found


def _leads_to_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # stat of the target only: nothing in it is opened
    except OSError:
        return False


def is_mount_point(path: Path) -> bool:
    """os.path.ismount, plus the kernel's mount table: a bind mount on the same filesystem has the same device."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            points = {line.split()[4].replace("\\040", " ") for line in fh if len(line.split()) > 4}
    except OSError:  # not Linux: ismount's answer stands
        return False
    return os.path.realpath(path) in points


@dataclass
class _Seen:
    signature: tuple[int, int]  # (size, mtime_ns)
    since: float  # monotonic time this signature was first seen


class StabilityTracker:
    """Says when a file's size and mtime have not changed for the settle window (the upload is over)."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[str, _Seen] = {}

    def is_stable(self, path: Path, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        try:
            st = os.lstat(path)
        except OSError:
            self._seen.pop(str(path), None)
            return False
        signature = (st.st_size, st.st_mtime_ns)
        seen = self._seen.get(str(path))
        if seen is None or seen.signature != signature:
            self._seen[str(path)] = _Seen(signature, now)
            return self.settle_seconds <= 0
        return now - seen.since >= self.settle_seconds

    def forget(self, path: Path) -> None:
        self._seen.pop(str(path), None)


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


class InboxWatcher:
    """Wakes the supervisor on inbox events and says when a (re)scan is due; survives inbox outages."""

    def __init__(self, inbox: Path, rescan_seconds: float, polling: bool = False) -> None:
        self.inbox = inbox
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self.wake = threading.Event()
        self._observer: Observer | PollingObserver | None = None
        self._last_scan = float("-inf")
        self.outage: str | None = None
        self.mounted: bool | None = None  # whether the inbox was a mount point when first seen

    def start(self) -> None:
        """Start watching if the inbox is there; an outage is recorded and retried by `scan`."""
        self._start_observer()

    def _start_observer(self) -> None:
        if self._observer is not None and self._observer.is_alive():
            return
        self._stop_observer()
        try:
            check_inbox(self.inbox)
            observer = PollingObserver(timeout=1.0) if self.polling else Observer()
            observer.schedule(_Wake(self.wake), str(self.inbox), recursive=True)
            observer.start()
        except (OSError, InboxOutage) as exc:
            log.error("INBOX OUTAGE: cannot watch %s (%s); rescanning every %.0f s", self.inbox, exc,
                      self.rescan_seconds)
            return
        self._observer = observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def due(self, now: float | None = None) -> bool:
        """True when an event arrived or the rescan interval passed since the last scan."""
        now = time.monotonic() if now is None else now
        return self.wake.is_set() or now - self._last_scan >= self.rescan_seconds

    def scan(self, now: float | None = None) -> list[Candidate] | None:
        """The candidates, or None during an outage (logged loudly once, then retried)."""
        self._last_scan = time.monotonic() if now is None else now
        self.wake.clear()
        try:
            self._check_mount()
            found = scan_inbox(self.inbox)
        except InboxOutage as exc:
            if self.outage is None:
                log.error("INBOX OUTAGE: %s. Nothing is treated as deleted; staged jobs wait. Retrying.", exc)
            self.outage = str(exc)
            self._stop_observer()
            return None
        if self.outage is not None:
            log.warning("inbox %s is back after an outage (%s)", self.inbox, self.outage)
            self.outage = None
        self._start_observer()
        return found

    def _check_mount(self) -> None:
        """An inbox that was a mount point and is not any more is an unmounted share: the empty folder left
        behind is not the inbox, and reading it would take every staged manifest for deleted."""
        if not os.path.isdir(self.inbox):
            return  # scan_inbox reports it
        mounted = is_mount_point(self.inbox)
        if self.mounted is None:
            self.mounted = mounted
        elif self.mounted and not mounted:
            raise InboxOutage(f"inbox {self.inbox} was a mount point and is not any more (share unmounted?)")

    def stop(self) -> None:
        self._stop_observer()
