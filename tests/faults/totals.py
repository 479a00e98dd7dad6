"""The fault suite's running totals: what each fault test did (jobs dropped, kills) and what it found broken.

Tests add to TOTALS; tests/conftest.py prints `totals_line()` as the run's very last line. Counting only:
the assertions that the broken counts are zero stay in the tests themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Totals:
    jobs: int = 0  # jobs (manifests) a fault test dropped or submitted
    kills: int = 0  # SIGKILLs (and SIGSTOPs past a lease) of a supervisor, a rank or a host
    lost: int = 0  # a dropped job that ended nowhere: no delivery, no reason, not in the ledger
    doubled: int = 0  # a job delivered more than once
    partial: int = 0  # a delivered file that is incomplete, or an interrupted write left behind
    unexplained: int = 0  # a failure or rejection without a reason the user can read

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def broken(self) -> int:
        return self.lost + self.doubled + self.partial + self.unexplained


TOTALS = Totals()


def totals_line() -> str:
    t = TOTALS
    return (f"fault suite: {t.jobs} jobs, {t.kills} kills, {t.lost} lost, {t.doubled} delivered twice, "
            f"{t.partial} partial, {t.unexplained} without a reason")
