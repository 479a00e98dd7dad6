"""CFG-parallel: half the ranks run the conditional branch, half the unconditional, each half with Ulysses inside.

It must not run the model or the solver; it only splits the ranks and combines the two velocities every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.parallel.ulysses import ParallelConfigError, UlyssesParallel, check_heads

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class ParallelPlan:
    """How the world's ranks are used: cfg (1 or 2 branch groups) x ulysses (ranks per branch)."""

    world_size: int
    cfg: int
    ulysses: int

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "cfg": self.cfg, "ulysses": self.ulysses}


def plan_parallel(world_size: int, num_heads: int, cfg_parallel: bool, needs_cfg: bool = True) -> ParallelPlan:
    """Validate and build the layout; CFG-parallel needs an even world and a job with two branches."""
    cfg = 2 if cfg_parallel and needs_cfg else 1
    if cfg == 2 and world_size % 2:
        raise ParallelConfigError(
            f"cfg_parallel: got {world_size} ranks, expected an even number (the cond and uncond halves "
            f"must be the same size); use an even GPU count or turn cfg_parallel off"
        )
    ulysses = world_size // cfg
    check_heads(num_heads, ulysses)
    return ParallelPlan(world_size=world_size, cfg=cfg, ulysses=ulysses)


class CfgParallel:
    """This rank's branch, its Ulysses group, and the exchange of velocities with the other half.

    Ranks [0, p/2) compute the conditional velocity, ranks [p/2, p) the unconditional one; rank r is
    paired with rank r ± p/2, and after each forward the pair swaps results so that every rank computes
    the same guided velocity uncond + g * (cond - uncond) and the same solver step.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        world = dist.get_world_size(group)
        if world % 2:
            raise ParallelConfigError(f"cfg_parallel: got {world} ranks, expected an even number")
        rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        half = world // 2
        # new_group is collective: every rank creates every group, in the same order.
        halves = [dist.new_group(ranks[:half]), dist.new_group(ranks[half:])]
        pairs = [dist.new_group([ranks[i], ranks[i + half]]) for i in range(half)]
        self.branch = COND if rank < half else UNCOND
        self.sp = UlyssesParallel(halves[self.branch]) if half > 1 else None
        self._pair = pairs[rank % half]
        self._cond_rank = ranks[rank % half]  # the conditional member of this rank's pair (a global rank)

    def __call__(self, model: Any, latent: torch.Tensor, t: torch.Tensor, cond_kwargs: Mapping[str, Any],
                 uncond_kwargs: Mapping[str, Any], scale: float) -> torch.Tensor:
        """The sampling loop's `Guidance`: this half runs its own branch only, then the halves swap."""
        if scale == 1.0:  # guidance off (distilled models): no unconditional forward at all, as the sequential one
            return self.conditional(model(latent, t, **cond_kwargs) if self.branch == COND else None, latent)
        velocity = model(latent, t, **(cond_kwargs if self.branch == COND else uncond_kwargs))
        cond, uncond = self.exchange(velocity)
        return uncond + scale * (cond - uncond)

    def conditional(self, velocity: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor:
        """The conditional half's velocity (float32, the latent's shape) on both halves; the unconditional half
        passes None: it ran nothing this step."""
        shared = velocity.float().contiguous() if velocity is not None else torch.empty_like(latent, dtype=torch.float32)
        dist.broadcast(shared, src=self._cond_rank, group=self._pair)
        return shared

    def exchange(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Give this half's velocity, get (cond, uncond) — identical on every rank."""
        both = [torch.empty_like(velocity) for _ in range(2)]
        dist.all_gather(both, velocity.contiguous(), group=self._pair)  # pair order = (cond rank, uncond rank)
        return both[COND], both[UNCOND]

    def guide(self, velocity: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided velocity from this half's velocity: uncond + g * (cond - uncond), the reference's order."""
        cond, uncond = self.exchange(velocity)
        return uncond + scale * (cond - uncond)
