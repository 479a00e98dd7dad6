"""pipeline.worker with one injected fault, for the real-pool tests, once per marker file
(WANBOX_TEST_FAULT_MARKER) so that the relaunched pool works. WANBOX_TEST_FAULT says where:

* `attention`: rank 1 raises in its first attention call, while rank 0 goes on into the next collective;
* `load`: rank 1 raises while loading the models, while rank 0 goes on into creating the parallel groups;
* `checkpoint:N`: rank 0 (the checkpoint writer) SIGKILLs itself right after it saved the checkpoint of step
  N, the exact point a test of resume needs (a kill timed by polling the ledger races a fast CPU).

    python -m torch.distributed.run ... -m tests.workers.faulty_rank_worker <pipeline.worker arguments>
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


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
    elif where.startswith("checkpoint:"):
        kill_after_checkpoint(int(where.partition(":")[2]), marker)
    else:
        raise SystemExit(f"WANBOX_TEST_FAULT={where!r}: expected attention, load or checkpoint:N")


def kill_after_checkpoint(step: int, marker: Path) -> None:
    from pipeline.sampling.checkpoint import CheckpointStore

    save = CheckpointStore.save

    def save_then_die(self: CheckpointStore, state: Any) -> None:
        save(self, state)
        if state.step == step:
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    CheckpointStore.save = save_then_die  # type: ignore[method-assign]


def fault_rank(where: str) -> str:
    return "0" if where.startswith("checkpoint:") else "1"


if __name__ == "__main__":
    marker = Path(os.environ["WANBOX_TEST_FAULT_MARKER"])
    where = os.environ.get("WANBOX_TEST_FAULT", "attention")
    if os.environ.get("RANK") == fault_rank(where) and not marker.exists():
        inject_fault(where, marker)
    from pipeline.worker import main

    sys.exit(main())
