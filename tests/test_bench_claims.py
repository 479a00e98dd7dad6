"""bench/bench_claims.py's own logic, tiny: claimer processes on a real PostgreSQL take each job exactly once, the
report carries its fields, and its checks catch a double claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.bench_claims import check, main, run
from daemon.ledger import Ledger
from tests import pg

FIELDS = {"claimers", "jobs", "wall_s", "claims_per_s", "per_claimer", "claim_ms", "finish_ms", "load_1min_before", "checks"}


@pytest.mark.postgres
def test_two_claimer_processes_on_postgresql_take_each_job_exactly_once(pg_cluster: pg.Cluster) -> None:
    url = pg_cluster.create_database()
    try:
        result = run(url, jobs=40, claimers=2)
    finally:
        pg_cluster.drop_database(url)
    assert set(result) == FIELDS
    assert result["checks"] == {"claimed_exactly_once": True, "events_one_claim_each": True, "none_left_ready": True,
                                "all_done": True, "audit_clean": True, "claimers_exited_0": True, "ok": True}  # fmt: skip
    assert sum(result["per_claimer"]) == 40 and len(result["per_claimer"]) == 2
    assert result["claims_per_s"] > 0 and 0 < result["claim_ms"]["p50"] <= result["claim_ms"]["p99"] <= result[
        "claim_ms"]["max"]  # fmt: skip


def test_report_on_sqlite_has_its_fields_and_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "claims.json"
    assert main(["--jobs", "12", "--claimers", "1,2", "--backends", "sqlite", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out.read_text())
    assert json.loads(printed[-1]) == report and report["ok"] is True
    assert [b["backend"] for b in report["backends"]] == ["sqlite"]
    runs = report["backends"][0]["runs"]
    assert [r["claimers"] for r in runs] == [1, 2] and all(set(r) == FIELDS for r in runs)
    assert printed[0].startswith("| backend | claimers |") and sum(line.count("| ok |") for line in printed) == 2


def test_checks_catch_a_double_claim_and_a_job_left_over(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        job = ledger.add_staged("cat", "i2v", "inbox/cat.toml", None)
        doubled = check(ledger, {job.id}, [job.id, job.id], [0])
        missed = check(ledger, {job.id}, [], [0])
    assert doubled["claimed_exactly_once"] is False and doubled["ok"] is False
    assert missed["claimed_exactly_once"] is False and missed["all_done"] is False


def test_bad_claimers_flag_names_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--claimers", "3,ten"])
    assert "--claimers '3,ten': expected comma-separated whole numbers" in capsys.readouterr().err
