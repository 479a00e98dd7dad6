"""Shared test fixtures: where the read-only reference material lives, and the GPU marker.

Tests use the real fixtures and media beside the checkout (../shared); nothing here fakes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WAN_REF = SHARED / "fixtures" / "wan_ref"
MEDIA = SHARED / "media"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is absent (CI has no GPU); they run on the GPU machines."""
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
