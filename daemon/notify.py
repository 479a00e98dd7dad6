"""A small stdlib sd_notify: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1 to systemd's NOTIFY_SOCKET.

Silent no-op outside systemd (no NOTIFY_SOCKET); it must never raise into the supervisor loop,
since a notification that cannot be sent is not a reason to stop making videos.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("wanbox.notify")


def _address(raw: str) -> str | bytes:
    # "@name" is a Linux abstract socket: the leading @ stands for a NUL byte.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def sd_notify(message: str) -> bool:
    """Send one notification ("KEY=value" lines); True if it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


class Notifier:
    """Remembers what was sent, so STATUS is only re-sent when it changes and pings are paced."""

    def __init__(self) -> None:
        self.interval = watchdog_interval()
        self._last_ping = 0.0
        self._status = ""
        self.ready_sent = False

    def ready(self) -> None:
        if not self.ready_sent:
            sd_notify("READY=1")
            self.ready_sent = True

    def status(self, text: str) -> None:
        text = text.replace("\n", " ")
        if text != self._status:
            self._status = text
            sd_notify(f"STATUS={text}")

    def healthy(self) -> None:
        """Call from the loop after each healthy iteration: pings the watchdog when one is due."""
        now = time.monotonic()
        if self.interval is not None and now - self._last_ping >= self.interval:
            self._last_ping = now
            sd_notify("WATCHDOG=1")

    def stopping(self) -> None:
        sd_notify("STOPPING=1")
