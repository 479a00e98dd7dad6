"""The warm pool on CUDA: NCCL compute group + gloo control group, tiny model, Ulysses over the GPUs present.

Marked `gpu` (skipped without CUDA); the CPU versions of the same checks are in test_worker_pool.py.
"""

from __future__ import annotations

import pytest

from daemon import protocol
from pipeline.video import probe
from tests.test_worker_pool import Supervisor, tiny_i2v  # noqa: F401 - the module-scoped checkpoint fixture


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [(), ("--cfg-parallel",), ("--sharding", "fsdp")])
def test_pool_on_gpus_runs_jobs(tiny_i2v, tmp_path, extra) -> None:  # noqa: F811
    import torch

    nproc = min(2, torch.cuda.device_count())
    if nproc < 2 and extra:
        pytest.skip("CFG-parallel and FSDP need 2 GPUs")
    sup = Supervisor(tmp_path, tiny_i2v, nproc=nproc, extra=("--device", "cuda", "--dtype", "bf16", *extra))
    try:
        hello, _ = sup.until(("hello",))
        assert hello["world_size"] == nproc and all(d["name"] != "cpu" for d in hello["devices"])
        sup.until(("ready",))
        for job, frames in (("gpu-a", 5), ("gpu-b", 9)):
            sup.run(job, frames=frames, steps=3)
            done, _ = sup.until(("done", "error"))
            assert done["type"] == "done", f"{done}\n{sup.logs()}"
            assert probe(done["output"])[0] == frames
            assert len(done["stats"]["peak_memory"]) == nproc and min(done["stats"]["peak_memory"]) > 0
        sup.chan.send(protocol.Shutdown())
        assert sup.proc.wait(timeout=120) == 0, sup.logs()
    finally:
        sup.close()
