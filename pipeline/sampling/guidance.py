"""Classifier-free guidance as a pluggable strategy: v = uncond + g * (cond - uncond).

The default runs the two branches one after the other; a CFG-parallel strategy may replace it. It must not
know which model or pipeline it serves beyond the `Denoiser` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch


class Denoiser(Protocol):
    """One model forward: (latent [C, T, H, W], timestep int64 [1], branch inputs) -> velocity like latent."""

    def __call__(self, latent: torch.Tensor, t: torch.Tensor, **branch: Any) -> torch.Tensor: ...


class Guidance(Protocol):
    """How the conditional and unconditional branches are evaluated and mixed."""

    def __call__(self, model: Denoiser, latent: torch.Tensor, t: torch.Tensor,
                 cond_kwargs: Mapping[str, Any], uncond_kwargs: Mapping[str, Any], scale: float) -> torch.Tensor: ...


def mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The guidance formula, in the reference's order of operations."""
    return uncond + scale * (cond - uncond)


class SequentialGuidance:
    """Conditional forward, then unconditional forward (as the reference); scale 1.0 skips the second."""

    def __call__(self, model: Denoiser, latent: torch.Tensor, t: torch.Tensor,
                 cond_kwargs: Mapping[str, Any], uncond_kwargs: Mapping[str, Any], scale: float) -> torch.Tensor:
        cond = model(latent, t, **cond_kwargs)
        if scale == 1.0:
            return cond
        uncond = model(latent, t, **uncond_kwargs)
        return mix(cond, uncond, scale)
