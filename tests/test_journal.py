"""Structured journal records: the native protocol's encoding, a real datagram socket standing where journald's
is, the job id as a field from jlog, and the check that stderr is the journal."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

from daemon.journal import JournalHandler, encode_fields, stderr_is_journal, syslog_priority
from daemon.supervisor import jlog


def parse_fields(data: bytes) -> dict[str, str]:
    """The journal's side of the native protocol."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:  # KEY \n <u64 length> <bytes> \n
            key, (size,) = line, struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_values_with_newlines_use_the_length_prefixed_form() -> None:
    fields = {"MESSAGE": "line one\nline two", "PRIORITY": "3", "WANBOX_JOB": "20261121-101500-ab12"}
    data = encode_fields(fields)
    assert b"PRIORITY=3\n" in data and b"MESSAGE\n" + struct.pack("<Q", 17) + b"line one\nline two\n" in data
    assert parse_fields(data) == fields


def test_levels_map_to_syslog_priorities() -> None:
    assert [syslog_priority(lv) for lv in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]


@pytest.fixture
def journal(tmp_path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "journal.sock"
    server.bind(str(path))
    server.settimeout(5)
    handler = JournalHandler(str(path))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("wanbox.supervisor")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield server
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    handler.close()
    server.close()


def test_job_lines_carry_the_job_id_as_a_field(journal: socket.socket) -> None:
    jlog(logging.ERROR, "20261121-101500-ab12", "failed: %s", "out of memory")
    fields = parse_fields(journal.recv(65536))
    assert fields["MESSAGE"] == "wanbox.supervisor: job 20261121-101500-ab12: failed: out of memory"
    assert fields["WANBOX_JOB"] == "20261121-101500-ab12" and fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "wanbox" and fields["LOGGER"] == "wanbox.supervisor"
    assert fields["CODE_FUNC"] == "jlog" and int(fields["CODE_LINE"]) > 0


def test_other_lines_have_no_job_field_and_tracebacks_survive(journal: socket.socket) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("wanbox.supervisor").exception("loop error")
    fields = parse_fields(journal.recv(65536))
    assert "WANBOX_JOB" not in fields and "Traceback" in fields["MESSAGE"] and "ValueError: boom" in fields["MESSAGE"]


def test_stderr_is_the_journal_only_when_systemd_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # stderr was redirected elsewhere
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()
