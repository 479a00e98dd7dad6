"""First-order Euler over any sigma list: the solver of step-distilled models (e.g. a 4-step preset).

Needs no history; it must not assume the default UniPC/DPM++ schedules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.sampling.base import FlowSolver
from pipeline.sampling.schedule import dpm_sigmas, explicit_sigmas, to_schedule


class EulerSolver(FlowSolver):
    """x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v_k."""

    name = "euler"

    def __init__(self, steps: int, shift: float, timesteps: Sequence[int | float] | None = None) -> None:
        sigmas = dpm_sigmas(steps, shift) if timesteps is None else explicit_sigmas(timesteps, shift)
        super().__init__(*to_schedule(sigmas))

    def _update(self, k: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + (self.sigmas[k + 1] - self.sigmas[k]) * v
