"""The crash-test hook: `kill_point(name)` SIGKILLs this process when WANBOX_DIE_AT names that point (as
`name` or `name:N`, the N-th time it is reached; several comma-separated), and freezes it (SIGSTOP, as a host
that hangs or is cut off would look to the others) when WANBOX_FREEZE_AT names it; otherwise it does nothing.

It must stay a no-op costing one dict look-up when the variables are unset, and must never do anything but die
or stop.
"""

from __future__ import annotations

import os
import signal

ENV = "WANBOX_DIE_AT"
FREEZE_ENV = "WANBOX_FREEZE_AT"  # a test sends SIGCONT when it wants the process to go on

# Every point placed in the daemon, in the order a job meets them: the kill-matrix test walks this list, so a
# point added here is covered there (and a point used in the code but missing here is refused at once).
POINTS = (
    # accept: inbox -> work/<id>/inbox
    "accept.intent", "accept.moved_input", "accept.moved_manifest", "accept.recorded",
    # reject: inbox -> failed/<name>/ with error.txt
    "reject.intent", "reject.dir_made", "reject.reason_written", "reject.moved_input", "reject.moved_manifest",
    "reject.moved_folder", "reject.recorded",
    # fail: work/<id>/inbox -> failed/<name>/ with error.txt
    "fail.counted", "fail.intent", "fail.reason_written", "fail.pointer_written", "fail.moved",
    # finalize: work/<id>/output.mp4 -> outbox/<name>.{mp4,jpg,<extras>,json}
    "finalize.begin", "finalize.intent", "finalize.staged", "finalize.published", "finalize.recorded",
    "finalize.cleaned",
    # a move onto another filesystem (inbox -> work/; inbox or work/ -> failed/): copied under a temporary name,
    # renamed into place (the source not yet removed)
    "accept.copied", "accept.copy_placed", "reject.copied", "reject.copy_placed", "fail.copied", "fail.copy_placed",
    # state boundaries of a run
    "state.preprocessing", "state.ready", "state.sampling",
)  # fmt: skip


def _parse(spec: str, env: str = ENV) -> dict[str, int]:
    targets: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, nth = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"{env}={spec!r}: {name!r} is not a kill point; expected one of {', '.join(POINTS)}")
        targets[name] = int(nth) if nth else 1
    return targets


_TARGETS = {name: (nth, signal.SIGKILL) for name, nth in _parse(os.environ.get(ENV, "")).items()}
_TARGETS |= {name: (nth, signal.SIGSTOP) for name, nth in _parse(os.environ.get(FREEZE_ENV, ""), FREEZE_ENV).items()}
_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up, as a power cut or the OOM killer would) if the test hook says so."""
    if not _TARGETS:
        return
    if name not in POINTS:
        raise ValueError(f"kill_point({name!r}): not in faults.POINTS")
    if name not in _TARGETS:
        return
    _reached[name] = _reached.get(name, 0) + 1
    nth, how = _TARGETS[name]
    if _reached[name] == nth:
        os.kill(os.getpid(), how)
