"""Log records to systemd's journal with fields of their own, so that one job's story is one query:

    journalctl -u wanbox WANBOX_JOB=20261121-101500-ab12

`wanbox serve` uses it when systemd has connected its stderr to the journal (JOURNAL_STREAM names stderr's
device and inode), in place of the plain stderr lines, so nothing is logged twice. Standard library only: the
journal's native protocol is one datagram per record of `KEY=value` lines, where a value containing a newline
is sent as `KEY`, a newline, its length as 64-bit little-endian, the bytes and a newline.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOB_FIELD = "WANBOX_JOB"  # set from a record's `job` attribute (jlog passes it as `extra`)
log = logging.getLogger("wanbox.supervisor")  # every part of the supervisor logs under one name


def jlog(level: int, job_id: str, text: str, *args: object) -> None:
    """Every line about a job starts with its id and carries it as a field: under systemd
    `journalctl -u wanbox WANBOX_JOB=ID`, or `journalctl | grep ID`, tells its whole story."""
    log.log(level, f"job {job_id}: {text}", *args, extra={"job": job_id})


def syslog_priority(levelno: int) -> int:
    """logging level -> syslog priority (journalctl -p): ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for threshold, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= threshold:
            return priority
    return 7


def encode_fields(fields: dict[str, str]) -> bytes:
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalHandler(logging.Handler):
    """Sends each record to the journal socket with MESSAGE, PRIORITY, the logger, the code location and,
    for records about a job, WANBOX_JOB."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, identifier: str = "wanbox") -> None:
        super().__init__()
        self.socket_path, self.identifier = socket_path, identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(syslog_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            job = getattr(record, "job", None)
            if job:
                fields[JOB_FIELD] = str(job)
            self.sock.sendto(encode_fields(fields), self.socket_path)
        except Exception:  # a full or absent journal must never stop the daemon
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal() -> bool:
    """Whether systemd connected stderr to the journal (JOURNAL_STREAM = "<device>:<inode>" of that stream)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"
