"""What a root must look like after any run, crashes included: each job delivered once, complete, or failed with
a reason; no leftovers of interrupted writes. Reads the root's folders and its ledger; changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av

from daemon.ledger import Ledger
from daemon.states import JobState
from tests.faults.totals import Totals

S = JobState
ENDED = (S.DONE, S.FAILED, S.REJECTED, S.CANCELLED)


def check_root(root: Path, dropped: list[str], ledger: Ledger) -> tuple[Totals, list[str]]:
    """Totals of what is broken under `root` for the job names in `dropped`, and one line per problem.

    Assumes the run has come to rest (every job ended); a job still in flight counts as lost."""
    problems: list[str] = []
    sidecars = _sidecars(root / "outbox", problems)
    videos = {p.name: p for p in (root / "outbox").glob("*.mp4")}
    per_job: dict[str, list[str]] = {}
    for name, data in sidecars.items():
        per_job.setdefault(str(data.get("job_id")), []).append(name)
    totals = Totals()
    totals.partial += _leftovers(root, problems)
    totals.partial += _unpaired_videos(videos, sidecars, problems)
    rows = ledger.list(limit=None)
    for job_id, names in per_job.items():
        if len(names) > 1:
            totals.doubled += len(names) - 1
            problems.append(f"job {job_id} delivered {len(names)} times: {sorted(names)}")
    by_name: dict[str, list[Any]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    for name in dropped:
        found = by_name.get(name, [])
        if not any(r.state in ENDED for r in found):
            totals.lost += 1
            problems.append(f"job {name!r} ended nowhere (ledger: {[r.state.value for r in found]})")
    for row in rows:
        totals.unexplained += _unexplained(root, row, problems)
        if row.state == S.DONE:
            totals.partial += _undelivered(row, videos, problems)
    totals.partial += _orphan_sidecars(sidecars, {r.id: r for r in rows}, problems)
    for folder in (root / "failed").iterdir() if (root / "failed").is_dir() else ():
        if folder.is_dir() and not (folder / "error.txt").is_file():
            totals.unexplained += 1
            problems.append(f"failed/{folder.name}/ has no error.txt")
    return totals, problems


def _sidecars(outbox: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    found = {}
    for path in outbox.glob("*.json"):
        try:
            found[path.name] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"outbox/{path.name} is not JSON: {exc}")
    return found


def _leftovers(root: Path, problems: list[str]) -> int:
    left = [p for folder in ("outbox", "failed") for p in (root / folder).rglob(".*.tmp")]
    left += [p for folder in ("inbox", "work", "failed") for p in (root / folder).rglob(".*.copying")]
    for p in left:
        problems.append(f"leftover of an interrupted write: {p.relative_to(root)}")
    return len(left)


def _unpaired_videos(videos: dict[str, Path], sidecars: dict[str, dict[str, Any]], problems: list[str]) -> int:
    """A video without its sidecar, or one that does not decode to the frames its sidecar promises."""
    broken = 0
    for name, path in videos.items():
        meta = sidecars.get(path.with_suffix(".json").name)
        frames = _decoded_frames(path)
        expected = (meta or {}).get("parameters", {}).get("video", {}).get("frames")
        if meta is None or frames is None or (expected is not None and frames != expected):
            broken += 1
            problems.append(f"outbox/{name}: sidecar {'present' if meta else 'missing'}, {frames} frames decoded, "
                            f"{expected} expected")
    return broken


def _decoded_frames(path: Path) -> int | None:
    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))
    except Exception:
        return None


def _unexplained(root: Path, row: Any, problems: list[str]) -> int:
    if row.state in (S.FAILED, S.REJECTED) and not (row.last_error or "").strip():
        problems.append(f"job {row.id} ({row.name}) is {row.state.value} with no reason in the ledger")
        return 1
    failed_dir = (row.outputs_json or {}).get("failed_dir") if row.state == S.REJECTED else None
    if failed_dir and not (Path(failed_dir) / "error.txt").is_file():  # the folder the ledger points the user to
        problems.append(f"job {row.id} ({row.name}) was rejected into {failed_dir}, which has no error.txt")
        return 1
    return 0


def _orphan_sidecars(sidecars: dict[str, dict[str, Any]], rows: dict[str, Any], problems: list[str]) -> int:
    """A sidecar in the outbox whose job the ledger does not call done (a second delivery of a done job is
    counted as doubled instead)."""
    broken = 0
    for name, data in sidecars.items():
        row = rows.get(str(data.get("job_id")))
        if row is None or row.state != S.DONE:
            broken += 1
            problems.append(f"outbox/{name}: delivered, but job {data.get('job_id')} is not done in the ledger "
                            f"({row.state.value if row is not None else 'no such job'})")
    return broken


def _undelivered(row: Any, videos: dict[str, Path], problems: list[str]) -> int:
    video = (row.outputs_json or {}).get("video")
    if video is None or Path(video).name not in videos:
        problems.append(f"job {row.id} ({row.name}) is done but its video {video} is not in the outbox")
        return 1
    return 0
