"""pipeline.worker with one injected fault, for the real-pool test: rank 1 raises in its first attention call
while rank 0 goes on into the next collective and waits there. Once per marker file (WANBOX_TEST_FAULT_MARKER),
so the relaunched pool's retry of the job succeeds.

    python -m torch.distributed.run ... -m tests.workers.faulty_rank_worker <pipeline.worker arguments>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def inject_fault(marker: Path) -> None:
    from pipeline.models import attention as attention_mod

    def failing_attention(*args: object, **kwargs: object) -> None:
        marker.touch()
        raise RuntimeError("injected fault on rank 1")

    attention_mod.attention = failing_attention  # before the models and Ulysses look it up


if __name__ == "__main__":
    marker = Path(os.environ["WANBOX_TEST_FAULT_MARKER"])
    if os.environ.get("RANK") == "1" and not marker.exists():
        inject_fault(marker)
    from pipeline.worker import main

    sys.exit(main())
