"""Non-finite values (NaN/Inf) in the denoising loop and the decoded frames: found cheaply, reported precisely.

Watches tensors and raises NonFiniteError; it must not change any tensor, and must not sync the device more
often than its caller asks (one reduction per step stays queued on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WHAT_TO_TRY = ("try another solver (sampling.solver), fewer or more steps, a lower guide_scale or shift, "
               "another seed, or float32 precision (the pool's --dtype fp32)")


class NonFiniteError(RuntimeError):
    """A NaN or Inf appeared; `where` is "latent" or "frames", `step` the 1-based sampling step that made it.

    Not retryable: the same seed and parameters recompute the same values, so a retry spends the GPU time
    again to fail at the same step (a faulty GPU is the exception: `wanbox retry` after fixing it).
    """

    kind = "numerics"
    retryable = False

    def __init__(self, message: str, *, where: str, step: int | None = None, clip: int | None = None,
                 expert: str | None = None) -> None:
        super().__init__(message)
        self.where, self.step, self.clip, self.expert = where, step, clip, expert


def finite_sum(x: torch.Tensor) -> torch.Tensor:
    """One reduction over x, non-finite exactly when some element is: float64 accumulation cannot overflow
    for float32/bf16 inputs (2^128 x 2^31 elements << 2^1024), and NaN/Inf propagate through a sum."""
    return x.sum(dtype=torch.float64)


class FiniteWatch:
    """One loop's latents, step by step: the sum of each step's latent is kept on the device (no sync); the
    host looks at them every `sync_every` steps and at `check()`, and names the FIRST non-finite step.

    expert_of(index) names the MoE expert that ran step `index` (0-based); clip/clips place an Animate clip.
    """

    def __init__(self, total: int, *, expert_of: Callable[[int], str] | None = None, clip: int | None = None,
                 clips: int | None = None, sync_every: int = 5) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every: got {sync_every!r}, expected an integer >= 1")
        self.total, self.expert_of, self.clip, self.clips = total, expert_of, clip, clips
        self.sync_every = sync_every
        self._sums: dict[int, torch.Tensor] = {}  # step index -> 0-dim float64 on the latent's device

    def observe(self, index: int, latent: torch.Tensor) -> None:
        """Queue the reduction for step `index`; look at the pending sums at the sync cadence."""
        self._sums[index] = finite_sum(latent)
        if (index + 1) % self.sync_every == 0:
            self.check()

    def finite(self) -> bool:
        """Whether every observed step was finite (one device sync); for "never save a bad state"."""
        return self._first_bad() is None

    def check(self) -> None:
        """Raise NonFiniteError for the first non-finite step seen so far (one device sync)."""
        bad = self._first_bad()
        if bad is None:
            return
        expert = self.expert_of(bad) if self.expert_of is not None else None
        place = [f"clip {self.clip + 1} of {self.clips}"] if self.clip is not None else []
        place += [f"expert {expert}"] if expert else []
        where = f" ({', '.join(place)})" if place else ""
        raise NonFiniteError(
            f"numerics: the latent became non-finite (NaN or Inf) at sampling step {bad + 1} of {self.total}"
            f"{where}; the video would be black or noise, so nothing was delivered; {WHAT_TO_TRY}",
            where="latent", step=bad + 1, clip=self.clip, expert=expert)

    def _first_bad(self) -> int | None:
        pending = sorted(self._sums)
        if not pending:
            return None
        flags = torch.isfinite(torch.stack([self._sums[i] for i in pending])).tolist()  # the one sync
        for index, ok in zip(pending, flags, strict=True):
            if not ok:
                return index
            del self._sums[index]  # a step known to be fine needs no second look
        return None


def check_finite_frames(video: torch.Tensor | None, *, clip: int | None = None, clips: int | None = None) -> None:
    """Raise NonFiniteError if the decoded frames hold a NaN/Inf (the latents were finite: the VAE made it)."""
    if video is None:  # ranks other than 0 after a pipelined decode hold no frames
        return
    if bool(torch.isfinite(finite_sum(video))):
        return
    place = f" of clip {clip + 1} of {clips}" if clip is not None and clips is not None else ""
    raise NonFiniteError(
        f"numerics: the decoded frames{place} contain NaN or Inf although every denoising step was finite: the "
        f"VAE decode produced them; check the VAE weights (wanbox models verify --deep), then {WHAT_TO_TRY}",
        where="frames", clip=clip)
