"""pipeline.worker with one injected fault on rank 1, for the real-pool tests, once per marker file
(WANBOX_TEST_FAULT_MARKER) so that the relaunched pool works. WANBOX_TEST_FAULT says where:

* `attention`: rank 1 raises in its first attention call, while rank 0 goes on into the next collective;
* `load`: rank 1 raises while loading the models, while rank 0 goes on into creating the parallel groups.

    python -m torch.distributed.run ... -m tests.workers.faulty_rank_worker <pipeline.worker arguments>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def inject_fault(where: str, marker: Path) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        marker.touch()
        raise RuntimeError(f"injected {where} fault on rank 1")

    if where == "attention":
        from pipeline.models import attention as attention_mod

        attention_mod.attention = fail  # before the models and Ulysses look it up
    elif where == "load":
        from pipeline.i2v import I2VModels

        I2VModels.load = fail  # type: ignore[method-assign]
    else:
        raise SystemExit(f"WANBOX_TEST_FAULT={where!r}: expected attention or load")


if __name__ == "__main__":
    marker = Path(os.environ["WANBOX_TEST_FAULT_MARKER"])
    if os.environ.get("RANK") == "1" and not marker.exists():
        inject_fault(os.environ.get("WANBOX_TEST_FAULT", "attention"), marker)
    from pipeline.worker import main

    sys.exit(main())
