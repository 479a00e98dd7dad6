"""Shared test fixtures: where the read-only reference material lives, and the GPU marker.

Tests use the real fixtures and media beside the checkout (../shared); nothing here fakes them.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def wan_ref() -> Path:
    assert WAN_REF.is_dir(), f"reference fixtures missing at {WAN_REF}"
    return WAN_REF


@pytest.fixture(scope="session")
def media() -> Path:
    assert MEDIA.is_dir(), f"test media missing at {MEDIA}"
    return MEDIA
