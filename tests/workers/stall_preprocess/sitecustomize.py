"""Imported at start-up by every Python process of a test daemon whose PYTHONPATH names this folder (the
supervisor and its CPU pool): the first preparation, once per marker file (WANBOX_TEST_STALL_MARKER), hangs
without progress, as a wedged decoder would; every later one runs normally."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_MARKER = os.environ.get("WANBOX_TEST_STALL_MARKER")

if _MARKER:
    import daemon.preprocessing as _preprocessing

    _real_prepare_job = _preprocessing.prepare_job

    def prepare_job(*args: Any, **kwargs: Any) -> dict[str, Any]:
        marker = Path(_MARKER)
        if not marker.exists():
            marker.touch()
            time.sleep(3600)
        return _real_prepare_job(*args, **kwargs)

    _preprocessing.prepare_job = prepare_job  # before the supervisor imports it
