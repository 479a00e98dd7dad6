"""The worker's error classification and phase timing, without processes: what the supervisor is told."""

from __future__ import annotations

import json
import time

import pytest
import torch

from daemon import protocol
from pipeline.families.base import JobInputError
from pipeline.worker import JobReport, classify_failure
from tests.jobs import resolved_job


class Recorder:
    def __init__(self) -> None:
        self.sent: list[protocol.Message] = []

    def say(self, msg: protocol.Message) -> None:
        protocol.encode(msg)  # every message the worker builds must be valid protocol
        self.sent.append(msg)


def test_out_of_memory_says_what_to_change() -> None:
    msg = classify_failure("j1", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    protocol.encode(msg)
    assert (msg.kind, msg.retryable, msg.job) == ("oom", False, "j1")
    for advice in ("fewer frames", "smaller size", "more GPUs", "--sharding fsdp"):
        assert advice in msg.message


@pytest.mark.parametrize(("exc", "kind", "retryable"), [
    (JobInputError("params.video.frames: missing"), "input", False),
    (ValueError("frames: got 6, expected 4n+1"), "input", False),
    (FileNotFoundError("/x/prepared.png"), "input", False),
    (RuntimeError("NCCL communicator was aborted"), "internal", True),
])
def test_failures_are_classified(exc, kind, retryable) -> None:
    msg = classify_failure("j2", exc)
    protocol.encode(msg)
    assert (msg.kind, msg.retryable) == (kind, retryable)
    assert str(exc).splitlines()[0] in msg.message


def test_missing_params_name_the_field() -> None:
    """A run command whose job lacks a field is refused at the protocol, naming it; a complete one passes."""
    run = protocol.Run(job="j", kind="i2v", inputs={}, output="/o.mp4", params=resolved_job(seed=7))
    wire = json.loads(protocol.encode(run))
    del wire["params"]["sampling"]["seed"]
    with pytest.raises(protocol.ProtocolError, match=r"run\.params\.sampling\.seed: missing"):
        protocol.decode(json.dumps(wire))
    wire["params"]["sampling"]["seed"] = 7
    assert protocol.to_message(protocol.decode(json.dumps(wire))).params.video.fps == 16


def test_progress_messages_and_phase_times() -> None:
    link = Recorder()
    report = JobReport("j3", link)  # type: ignore[arg-type]
    report.progress("encode", 0, 1)
    time.sleep(0.05)
    report.progress("sampling", 1, 2)
    report.progress("sampling", 2, 2)
    time.sleep(0.02)
    report.progress("encode", 1, 1)  # a phase may come back: its time adds up
    report.finish()
    assert [(m.phase, m.step, m.total) for m in link.sent] == [
        ("encode", 0, 1), ("sampling", 1, 2), ("sampling", 2, 2), ("encode", 1, 1)]
    assert report.phases["encode"] >= 0.05 and report.phases["sampling"] >= 0.02
    assert set(report.phases) == {"encode", "sampling"}
