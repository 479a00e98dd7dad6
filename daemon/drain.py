"""`wanbox drain [--host ID] [--undo]`: ask a host to take no new jobs (it finishes the job it runs, then idles as
`drained`), or to take them again. Only the request is written (hosts.drain); the host's loop reads it with its
next heartbeat. It must not touch jobs.
"""

from __future__ import annotations

from typing import Any

from daemon.hosts import HostRecords


def request_drain(engine: Any, host_id: str, undo: bool) -> tuple[bool, str]:
    """(done, what to print): the request written for a known host, else which hosts there are."""
    records = HostRecords(engine)
    if not records.set_drain(host_id, not undo):
        known = ", ".join(h.host_id for h in records.hosts()) or "none yet"
        return False, (f"no host {host_id!r} has ever served this ledger (known hosts: {known}); name one with "
                       "--host ID (its WANBOX_HOST_ID, as `wanbox status` lists them)")
    if undo:
        return True, f"host {host_id}: drain undone; it takes new jobs again with its next heartbeat"
    return True, (f"host {host_id}: drain requested; with its next heartbeat it takes no new jobs, finishes the one "
                  "it runs, then idles as 'drained' (see `wanbox status`); undo with `wanbox drain --undo`")
