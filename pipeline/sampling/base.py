"""The solver interface shared by UniPC, DPM++ and Euler: a schedule plus a sequential `step`.

A solver object belongs to exactly one sampling run; it must not be shared between runs or threads.
"""

from __future__ import annotations

from typing import Any

import torch

# What a solver's state_dict() holds: tensors (device ones included), lists of tensors, ints, strings, None.
SolverState = dict[str, Any]


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

    # -- state: everything `step` depends on besides the schedule, to continue a run exactly elsewhere

    def state_dict(self) -> SolverState:
        """The step index and the history (references to the live tensors, not copies); with the current
        latent, enough for a fresh solver of the same name and schedule to continue bitwise."""
        return {"solver": self.name, "num_steps": self.num_steps, "step_index": self.step_index,
                **self._history()}

    def load_state_dict(self, state: SolverState, device: torch.device | str | None = None) -> None:
        """Continue from `state` (tensors moved to `device`); SolverError, with nothing changed, if it does not
        belong to this solver or is inconsistent."""
        for key, expected in (("solver", self.name), ("num_steps", self.num_steps)):
            if state.get(key) != expected:
                raise SolverError(f"solver state: {key} is {state.get(key)!r}, this solver has {expected!r}")
        index = state.get("step_index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self.num_steps:
            raise SolverError(f"solver state: step_index {index!r}, expected an integer in [0, {self.num_steps}]")
        history = self._check_history(state, index)
        self.step_index = index
        self._restore(history, device)

    def _history(self) -> SolverState:
        return {}

    def _check_history(self, state: SolverState, index: int) -> SolverState:
        """The subclass's history entries of `state`, validated; SolverError if any is missing or wrong."""
        return {}

    def _restore(self, history: SolverState, device: torch.device | str | None) -> None:
        pass


def tensor_list(state: SolverState, key: str, most: int) -> list[torch.Tensor]:
    """state[key] as a list of at most `most` tensors of one shape, or SolverError naming the key."""
    value = state.get(key)
    if not isinstance(value, list) or len(value) > most or not all(isinstance(t, torch.Tensor) for t in value):
        raise SolverError(f"solver state: {key} must be a list of at most {most} tensors, got {type(value).__name__}")
    if len({tuple(t.shape) for t in value}) > 1:
        raise SolverError(f"solver state: {key} holds tensors of different shapes")
    return value


def moved(tensor: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor | None:
    return tensor if tensor is None or device is None else tensor.to(device)


def alpha_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha = 1 - sigma, log-SNR lambda = log(alpha) - log(sigma)) as float32 0-dim tensors."""
    alpha = 1 - sigma
    return alpha, torch.log(alpha) - torch.log(sigma)
