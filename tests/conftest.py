"""Shared test fixtures: the read-only reference material, the GPU marker, and the ledger's two backends.

Tests use the real fixtures and media beside the checkout (../shared) and real databases (an SQLite file, a
throwaway PostgreSQL cluster from tests/pg.py); nothing here fakes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WAN_REF = SHARED / "fixtures" / "wan_ref"
MEDIA = SHARED / "media"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is absent (CI has no GPU); they run on the GPU machines. Tests marked
    `soak` run only when asked for (-m soak, or WANBOX_SOAK=1): they are long by design."""
    if "soak" not in (config.getoption("-m") or "") and not os.environ.get("WANBOX_SOAK"):
        later = pytest.mark.skip(reason="a soak test: run with -m soak or WANBOX_SOAK=1")
        for item in items:
            if "soak" in item.keywords:
                item.add_marker(later)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_cpu_thread() -> Iterator[None]:
    """For modules of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_cpu_thread")`): tiny
    matmuls and convolutions gain nothing from intra-op threads, and on a loaded 2-core machine two threads
    spin-wait against each other (seen ~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def wan_ref() -> Path:
    assert WAN_REF.is_dir(), f"reference fixtures missing at {WAN_REF}"
    return WAN_REF


@pytest.fixture(scope="session")
def media() -> Path:
    assert MEDIA.is_dir(), f"test media missing at {MEDIA}"
    return MEDIA


# ---- the ledger's databases: every ledger test runs on SQLite and on PostgreSQL -----------------------

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.Cluster]:
    """One throwaway cluster for the session (started on first use, removed at the end).

    Without PostgreSQL the tests that need it are skipped, saying why; under CI (CI set) they fail instead:
    CI must never pass by skipping the PostgreSQL half of the ledger suite.
    """
    why = pg.unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PostgreSQL cannot run: {why}", pytrace=False)
        pytest.skip(why)
    cluster, seconds = pg.timed_start()
    STARTED.append((cluster, seconds))
    try:
        yield cluster
    finally:
        cluster.destroy()


STARTED: list[tuple[pg.Cluster, float]] = []  # the session's cluster, for the summary line


def pytest_unconfigure(config: pytest.Config) -> None:
    """The fault suite's totals as the run's very last line (after pytest's own summary), when it ran."""
    from tests.faults.totals import TOTALS, totals_line

    if TOTALS.jobs or TOTALS.kills:
        print(totals_line(), flush=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for cluster, seconds in STARTED:
        terminalreporter.write_line(f"PostgreSQL test cluster ({cluster.version()}): initdb + start "
                                    f"{seconds:.1f} s, {cluster.databases} databases made")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgresql": the test runs once per backend."""
    return str(request.param)


@pytest.fixture
def new_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Makes empty databases of this test's backend and returns their URLs; dropped after the test.

    Nothing is migrated here: the Ledger that opens the URL runs Alembic, exactly as in production.
    """
    made: list[str] = []
    cluster = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    if cluster is not None and not cluster.running:
        cluster.start()  # a test that stopped the server and failed before starting it again

    def make() -> str:
        if cluster is None:
            name = f"wanbox{len(made)}.db" if made else "wanbox.db"
            url = f"sqlite:///{tmp_path / name}"
        else:
            url = cluster.create_database()
        made.append(url)
        return url

    yield make
    if cluster is not None:
        if not cluster.running:
            cluster.start()
        for url in made:
            cluster.drop_database(url)


@pytest.fixture
def ledger_url(new_database: Callable[[], str]) -> str:
    """The URL of one empty database on this test's backend."""
    return new_database()
