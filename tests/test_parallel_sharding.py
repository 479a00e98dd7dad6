"""The replicate-or-shard decision from parameter bytes and free memory, read from real checkpoint headers.

The FSDP2 forward itself is checked against one process in test_parallel_sampling.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.parallel.sharding import ACTIVATION_RESERVE, choose_sharding, decide, expert_parameter_bytes

GIB = 2**30


def test_decide_replicates_when_weights_and_reserve_fit() -> None:
    experts_bf16 = 2 * 14_288_901_184 * 2  # both 14B experts in bf16: ~53 GiB
    assert decide("auto", experts_bf16, free_bytes=139 * GIB) == "replicate"  # H200
    assert decide("auto", experts_bf16, free_bytes=78 * GIB) == "fsdp"  # H100: no room for 720p activations
    assert decide("auto", experts_bf16, free_bytes=78 * GIB, world_size=1) == "offload"  # as the reference
    assert decide("auto", 10 * GIB, free_bytes=10 * GIB + ACTIVATION_RESERVE) == "replicate"
    assert decide("fsdp", 1, free_bytes=10**15) == "fsdp"  # an explicit choice wins
    assert decide("replicate", 10**15, free_bytes=1) == "replicate"


def test_decide_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="sharding: got 'zero3'.*auto, replicate, fsdp, offload"):
        decide("zero3", 1, 1)
    with pytest.raises(ValueError, match="'fsdp' needs 2 or more GPUs"):
        decide("fsdp", 1, 1, world_size=1)


def test_parameter_bytes_come_from_the_checkpoint_headers(wan_ref) -> None:
    from pipeline.weights.loader import tensor_shapes

    ckpt = wan_ref / "dit_i2v"
    numel = sum(torch.Size(s).numel() for e in ("high_noise_model", "low_noise_model")
                for s in tensor_shapes(ckpt / e).values())
    assert expert_parameter_bytes(ckpt, torch.bfloat16) == 2 * numel
    assert expert_parameter_bytes(ckpt, torch.float32) == 4 * numel


def test_cpu_pools_replicate(wan_ref) -> None:
    assert choose_sharding("auto", wan_ref / "dit_i2v", torch.device("cpu"), torch.float32) == "replicate"
    assert choose_sharding("offload", wan_ref / "dit_i2v", torch.device("cpu"), torch.float32) == "offload"
    with pytest.raises(ValueError, match="needs 2 or more GPUs"):  # no process group: a pool of one
        choose_sharding("fsdp", wan_ref / "dit_i2v", torch.device("cpu"), torch.float32)
