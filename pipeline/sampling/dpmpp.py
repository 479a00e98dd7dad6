"""Flow-matching DPM-Solver++ (2M, midpoint, flow prediction, lower-order final) as Wan's `dpm++` option.

Mirrors the reference float32 0-dim sigma arithmetic; sigma0 = 1 makes step 0 first order by construction.
"""

from __future__ import annotations

import torch

from pipeline.sampling.base import FlowSolver, SolverError, SolverState, alpha_lambda, moved, tensor_list
from pipeline.sampling.schedule import dpm_sigmas, to_schedule


class DPMSolverPP(FlowSolver):
    """Second-order multistep DPM-Solver++ on x0 predictions; first order at the first and last step."""

    name = "dpm++"

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(*to_schedule(dpm_sigmas(steps, shift)))
        self.x0_history: list[torch.Tensor] = []

    def _update(self, k: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m_k = x - self.sigmas[k] * v
        self.x0_history = (self.x0_history + [m_k])[-2:]
        last_step = k == self.num_steps - 1  # final sigma is 0: finish with first order
        if k == 0 or last_step:
            return self._first_order(k, x, m_k).to(v.dtype)
        return self._second_order(k, x).to(v.dtype)

    def _history(self) -> SolverState:
        return {"x0_history": list(self.x0_history)}

    def _check_history(self, state: SolverState, index: int) -> SolverState:
        history = tensor_list(state, "x0_history", 2)
        if len(history) != min(index, 2):
            raise SolverError(f"solver state: dpm++ holds {len(history)} predictions at step_index {index}, "
                              f"expected {min(index, 2)}")
        return {"x0_history": history}

    def _restore(self, history: SolverState, device: torch.device | str | None) -> None:
        self.x0_history = [moved(t, device) for t in history["x0_history"]]

    def _first_order(self, k: int, x: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s = self.sigmas[k + 1], self.sigmas[k]
        alpha_t, lambda_t = alpha_lambda(sigma_t)
        _, lambda_s = alpha_lambda(sigma_s)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0

    def _second_order(self, k: int, x: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[k + 1], self.sigmas[k], self.sigmas[k - 1]
        alpha_t, lambda_t = alpha_lambda(sigma_t)
        _, lambda_s0 = alpha_lambda(sigma_s0)
        _, lambda_s1 = alpha_lambda(sigma_s1)
        m0, m1 = self.x0_history[-1], self.x0_history[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        # at k = 1 after sigma0 = 1, h_0 is +inf and D1 vanishes (1/inf = 0), as in the reference
        d1 = (1.0 / r0) * (m0 - m1)
        factor = alpha_t * (torch.exp(-h) - 1.0)
        return (sigma_t / sigma_s0) * x - factor * m0 - 0.5 * factor * d1
