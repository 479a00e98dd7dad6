"""Where the DiT weights live: a copy on every GPU when they fit, else FSDP2 shards (or host offload on one GPU).

Decides from parameter bytes and free memory (overridable) and wraps modules; it must not load checkpoints
or change any computation (an FSDP forward gathers the very same weights before each block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SHARDINGS = ("auto", "replicate", "fsdp", "offload")
# Activations, the VAE, caches and allocator slack beside the weights on one GPU: the reference's 720p
# forward peaked at 59.3 GiB with 26.6 GiB of weights, so ~32 GiB at 81 frames (Ulysses divides most of it).
ACTIVATION_RESERVE = 32 * 2**30
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


def expert_parameter_bytes(ckpt_dir: Path, dtype: torch.dtype) -> int:
    """Bytes both I2V experts occupy in `dtype` (headers, no loading), plus the text encoder rank 0 holds."""
    from pipeline.weights.loader import tensor_shapes

    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for expert in ("high_noise_model", "low_noise_model"):
        for shape in tensor_shapes(ckpt_dir / expert).values():
            numel = 1
            for size in shape:
                numel *= size
            total += numel * itemsize
    t5 = ckpt_dir / T5_FILE  # stored in bf16, the dtype it runs in
    return total + (t5.stat().st_size if t5.is_file() else 0)


def decide(requested: str, weight_bytes: int, free_bytes: int, world_size: int = 2,
           reserve: int = ACTIVATION_RESERVE) -> str:
    """'replicate' when the weights plus the reserve fit in the smallest free memory; otherwise 'fsdp'
    across several GPUs, or on a single GPU 'offload' (the idle expert waits in host memory, as the
    reference does on one GPU)."""
    if requested not in SHARDINGS:
        raise ValueError(f"sharding: got {requested!r}, expected one of {', '.join(SHARDINGS)}")
    if requested == "fsdp" and world_size == 1:
        raise ValueError("sharding: 'fsdp' needs 2 or more GPUs; use 'offload' or 'replicate' on one GPU")
    if requested != "auto":
        return requested
    if weight_bytes + reserve <= free_bytes:
        return "replicate"
    return "fsdp" if world_size > 1 else "offload"


def choose_sharding(requested: str, ckpt_dir: Path, device: torch.device, dtype: torch.dtype,
                    group: dist.ProcessGroup | None = None) -> str:
    """The same decision on every rank: based on the least free memory of any rank. CPU pools replicate."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if requested != "auto" or device.type != "cuda":
        return decide(requested if requested != "auto" else "replicate", 0, 0, world)
    free = torch.tensor([torch.cuda.mem_get_info(device)[0]], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
    return decide("auto", expert_parameter_bytes(ckpt_dir, dtype), int(free.item()), world)


def shard_module(model: torch.nn.Module, device: torch.device, blocks_attr: str = "blocks") -> torch.nn.Module:
    """FSDP2 `fully_shard` on every transformer block, then on the root (embeddings, head).

    The parameters move to `device` as 1/world shards; each block's full weights are gathered just before
    its forward and freed after it, so peak weight memory is one shard of everything plus one block.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(model, blocks_attr):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def shard_experts(models: Any, device: torch.device) -> None:
    """Shard both I2V experts in place (loaded in host memory); from then on no expert is ever swapped."""
    shard_module(models.high_noise, device)
    shard_module(models.low_noise, device)
    models.offload_experts = False
