"""The solver interface shared by UniPC, DPM++ and Euler: a schedule plus a sequential `step`.

A solver object belongs to exactly one sampling run; it must not be shared between runs or threads.
"""

from __future__ import annotations

import torch


class SolverError(ValueError):
    """A solver was built or driven with values it cannot use (named field, value, expectation)."""


class FlowSolver:
    """Sigmas/timesteps and the bookkeeping of which step comes next; subclasses implement `_update`."""

    name = "base"

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self.timesteps = timesteps  # int64 [N], what the model is conditioned on
        self.sigmas = sigmas  # float32 [N+1], the last one 0
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def step(self, v: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Advance x from sigmas[k] to sigmas[k+1] given the velocity v; `t` is the step index k or t_k."""
        k = self._resolve_index(t)
        out = self._update(k, v.float(), x.float())
        self.step_index = k + 1
        return out

    def _resolve_index(self, t: int | torch.Tensor) -> int:
        # Multistep solvers keep a history, so steps must come in order; say so instead of drifting.
        if self.step_index >= self.num_steps:
            raise SolverError(f"{self.name}: all {self.num_steps} steps are done; build a new solver per run")
        if isinstance(t, torch.Tensor):
            expected = int(self.timesteps[self.step_index])
            if t.numel() != 1 or int(t.reshape(-1)[0]) != expected:
                raise SolverError(f"{self.name}: timestep {t.tolist()} given, expected {expected} "
                                  f"(step {self.step_index} of {self.num_steps})")
            return self.step_index
        if int(t) != self.step_index:
            raise SolverError(f"{self.name}: step index {t} given, expected {self.step_index} (steps run in order)")
        return int(t)

    def _update(self, k: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def alpha_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha = 1 - sigma, log-SNR lambda = log(alpha) - log(sigma)) as float32 0-dim tensors."""
    alpha = 1 - sigma
    return alpha, torch.log(alpha) - torch.log(sigma)
