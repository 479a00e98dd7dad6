"""`wanbox ledger migrate|status` and doctor's ledger checks, on SQLite and PostgreSQL: the real CLI entry
point on a real database named by the config, as an operator switching backends would use them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from daemon.cli import main
from daemon.config import load_config
from daemon.doctor import check_ledger
from daemon.ledger import SCHEMA_HEAD, Ledger
from tests import pg


def config_for(tmp_path: Path, ledger: str) -> Path:
    """A config naming the ledger as an operator would: `[paths] ledger = URL`."""
    (tmp_path / "root").mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nroot = "{tmp_path / "root"}"\nledger = "{ledger}"\n')
    return path


def wanbox(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    engine.dispose()
    return names


def test_migrate_creates_the_schema_once_and_status_reports_it(ledger_url: str, backend: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for(tmp_path, ledger_url)
    if backend == "postgresql":  # an empty database: reachable, no schema yet
        code, out, _ = wanbox(capsys, config, "ledger", "status", "--json")
        assert code == 0 and json.loads(out)["revision"] is None and not json.loads(out)["up_to_date"]
    code, out, err = wanbox(capsys, config, "ledger", "migrate")
    assert code == 0, err
    assert out.strip().endswith(f"migrated from an empty database to {SCHEMA_HEAD}")
    assert tables(ledger_url) == {"jobs", "events", "hosts", "daemon_runs", "notifications", "notification_attempts", "intents",
                                  "ingest_claims", "alembic_version"}
    code, out, _ = wanbox(capsys, config, "ledger", "migrate")
    assert code == 0 and out.strip().endswith(f"already at {SCHEMA_HEAD}, nothing to do")

    code, out, _ = wanbox(capsys, config, "ledger", "status", "--json")
    status = json.loads(out)
    assert code == 0
    assert (status["backend"], status["revision"], status["up_to_date"]) == (backend, SCHEMA_HEAD, True)
    assert status["server_version"].startswith({"sqlite": "SQLite 3.", "postgresql": "PostgreSQL "}[backend])
    code, out, _ = wanbox(capsys, config, "ledger", "status")
    assert f"backend:  {backend}" in out and f"schema:   {SCHEMA_HEAD} (the newest" in out
    assert ("clock:" in out) == (backend == "postgresql")


def test_status_of_a_missing_sqlite_ledger_says_so_and_creates_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "state" / "wanbox.db"
    missing.parent.mkdir()
    code, _, err = wanbox(capsys, config_for(tmp_path, str(missing)), "ledger", "status")
    assert code == 3 and f"no ledger at {missing}" in err
    checks = check_ledger(load_config(config_for(tmp_path, str(missing))))
    assert [(c.name, c.status) for c in checks] == [("ledger", "warn")] and "serve creates it" in checks[0].detail
    assert not missing.exists()


def test_doctor_passes_an_up_to_date_ledger_and_fails_one_from_a_newer_wanbox(ledger_url: str, backend: str,
                                                                               tmp_path: Path) -> None:
    cfg = load_config(config_for(tmp_path, ledger_url))
    Ledger.open(ledger_url).close()
    checks = {c.name: c for c in check_ledger(cfg)}
    assert checks["ledger"].status == "ok" and checks["ledger schema"].status == "ok"
    assert ("ledger clock" in checks) == (backend == "postgresql")
    if backend == "postgresql":  # the same host's clock: well within the limit
        assert checks["ledger clock"].status == "ok"
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0999'")
    engine.dispose()
    schema = {c.name: c for c in check_ledger(cfg)}["ledger schema"]
    assert schema.status == "fail" and "revision 0999" in schema.detail and "wanbox ledger migrate" in schema.detail


def test_doctor_warns_about_an_empty_database(ledger_url: str, backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        Path(ledger_url.removeprefix("sqlite:///")).touch()  # a file with no schema in it
    checks = {c.name: c for c in check_ledger(load_config(config_for(tmp_path, ledger_url)))}
    assert checks["ledger"].status == "ok"
    assert checks["ledger schema"].status == "warn" and "empty database" in checks["ledger schema"].detail
    assert tables(ledger_url) == set()  # doctor created nothing


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])  # only a server has a clock of its own
def test_doctor_warns_when_the_database_clock_disagrees_with_this_host(ledger_url: str, tmp_path: Path) -> None:
    Ledger.open(ledger_url).close()
    cfg = load_config(config_for(tmp_path, ledger_url))
    slow_host = {c.name: c for c in check_ledger(cfg, clock=lambda: time.time() - 10)}["ledger clock"]
    skew = float(slow_host.detail.split("clock is ")[1].split(" s")[0])  # measured, so 9.999 or 10.0
    assert slow_host.status == "warn" and abs(skew - 10.0) < 0.05 and "NTP" in slow_host.detail
    fast_host = {c.name: c for c in check_ledger(cfg, clock=lambda: time.time() + 2)}["ledger clock"]
    assert fast_host.status == "ok" and "-2.0" in fast_host.detail


@pytest.mark.postgres
def test_an_unreachable_database_is_a_failure_with_the_reason(pg_cluster: pg.Cluster, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"postgresql+psycopg://wanbox:hunter2@127.0.0.1:{pg.free_port()}/wanbox"  # nothing listens there
    config = config_for(tmp_path, nobody)
    (check,) = check_ledger(load_config(config))
    assert check.status == "fail" and "cannot reach the ledger" in check.detail
    assert "refused" in check.detail.lower() and "hunter2" not in check.detail
    code, _, err = wanbox(capsys, config, "ledger", "migrate")
    assert code == 1 and "cannot reach the ledger" in err and "hunter2" not in err
