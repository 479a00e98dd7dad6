"""VAE decode split across ranks as a pipeline over decoder layers: exact; up to P times faster when T >> P.

The decoder is causal in time with a receptive field spanning the whole clip, so time slices cannot be
decoded independently (see pipeline/models/vae.py). Instead each rank owns a contiguous group of decoder
layers: latent frame t flows rank -> rank while the earlier stages already work on frame t+1. Must not change
the computation: every layer sees the same inputs and the same cache as in a one-process decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipeline.models.vae import FeatureCache


def balanced_groups(costs: list[float], parts: int) -> list[tuple[int, int]]:
    """Split layers [0, n) into `parts` contiguous non-empty ranges minimising the costliest range (the
    pipeline's pace is its slowest stage). Exact dynamic programme: n is a few dozen layers, parts <= 8."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} decoder layers into {parts} non-empty groups")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][i]: the smallest possible max stage cost for the first i layers in k stages; cut[k][i]: its last cut
    best = [[float("inf")] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                candidate = max(best[k - 1][j], prefix[i] - prefix[j])
                if candidate < best[k][i]:
                    best[k][i], cut[k][i] = candidate, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def _timed_first_frame(vae: Any, latent: torch.Tensor, cache: FeatureCache) -> tuple[torch.Tensor, list[float]]:
    """Decode latent frame 0 through every layer, timing each (it also fills every layer's cache)."""
    x = vae.decoder_input(latent[:, :1])
    costs = []
    for i in range(vae.decoder_layer_count()):
        _sync(x)
        start = time.perf_counter()
        x = vae.run_decoder_layers(x, cache, i, i + 1)
        _sync(x)
        costs.append(time.perf_counter() - start)
    return vae.decoder_output(x), costs


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@torch.no_grad()
def decode_pipelined(vae: Any, latent: torch.Tensor, group: dist.ProcessGroup | None = None,
                     on_frames: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Every rank of `group` calls this with the same latent [z, T, h, w]; rank 0 gets the video
    [3, 1 + 4(T-1), 8h, 8w] (the same as vae.decode(latent)), the other ranks None. With `on_frames`, rank 0
    hands it each latent frame's pixel frames as soon as they exist (in order) and returns None.

    Frame 0 is decoded by every rank (it is 1/T of the work and leaves every layer's cache ready); the
    measured layer times split the layers into stages; rank 0 runs the last stage, so it ends up with the
    pixels it writes to the mp4.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cache = FeatureCache()
    first, costs = _timed_first_frame(vae, latent, cache)
    frames: list[torch.Tensor] = []
    keep = on_frames if on_frames is not None else frames.append
    if world == 1:
        keep(first)
        for t in range(1, latent.shape[1]):
            keep(vae.decode_step(latent[:, t : t + 1], cache))
        return torch.cat(frames, dim=1) if frames else None
    agreed = torch.tensor(costs, dtype=torch.float64, device=vae.device)  # NCCL needs it on the GPU
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)  # one split for all ranks
    stages = balanced_groups(agreed.tolist(), world)
    order = [*range(1, world), 0]  # stage s runs on rank order[s]; the last stage on rank 0
    stage = order.index(rank)
    lo, hi = stages[stage]
    previous = _global(group, order[stage - 1]) if stage > 0 else None
    following = _global(group, order[stage + 1]) if stage + 1 < world else None
    if rank == 0:
        keep(first)
    for t in range(1, latent.shape[1]):
        if previous is None:
            x = vae.decoder_input(latent[:, t : t + 1])
        else:
            x = _receive(previous, vae.dtype, vae.device, group)
        x = vae.run_decoder_layers(x, cache, lo, hi)
        if following is not None:
            _send(x, following, group)
        else:
            keep(vae.decoder_output(x))
    return torch.cat(frames, dim=1) if frames else None


def _global(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def _send(x: torch.Tensor, dst: int, group: dist.ProcessGroup | None) -> None:
    """Shape header (5 int64), then the activation (in the VAE's dtype): shapes change along the layers."""
    header = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    dist.send(header, dst, group=group)
    dist.send(x.contiguous(), dst, group=group)


def _receive(src: int, dtype: torch.dtype, device: torch.device, group: dist.ProcessGroup | None) -> torch.Tensor:
    header = torch.empty(5, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    x = torch.empty(header.tolist(), dtype=dtype, device=device)
    dist.recv(x, src, group=group)
    return x
