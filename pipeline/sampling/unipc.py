"""Flow-matching UniPC (bh2, order 2, lower-order final): UniC corrector + UniP predictor, as Wan's default.

Mirrors the reference float32 0-dim sigma arithmetic step for step; it must not reorder that arithmetic.
"""

from __future__ import annotations

import torch

from pipeline.sampling.base import FlowSolver, SolverError, SolverState, alpha_lambda, moved, tensor_list
from pipeline.sampling.schedule import to_schedule, unipc_sigmas


class UniPCSolver(FlowSolver):
    """x0-predicting UniPC: each step corrects the current sample (k > 0), then predicts the next one."""

    name = "unipc"
    order = 2

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(*to_schedule(unipc_sigmas(steps, shift)))
        self.x0_history: list[torch.Tensor] = []  # data predictions m_{k-1}, m_k (newest last)
        self.last_sample: torch.Tensor | None = None
        self.this_order = 0
        self.lower_order_nums = 0

    def _update(self, k: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # 1. data prediction from the uncorrected sample
        m_k = x - self.sigmas[k] * v
        # 2. UniC corrector with the order chosen at the previous step
        if k > 0 and self.last_sample is not None:
            x = self._correct(k, m_k, self.last_sample, x)
        self.x0_history = (self.x0_history + [m_k])[-self.order:]
        # 3. order: lower at the final step and while the history warms up
        order = min(self.order, self.num_steps - k)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        # 4. UniP predictor to sigma_{k+1}
        x_next = self._predict(k, x, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return x_next

    def _history(self) -> SolverState:
        return {"x0_history": list(self.x0_history), "last_sample": self.last_sample,
                "this_order": self.this_order, "lower_order_nums": self.lower_order_nums}

    def _check_history(self, state: SolverState, index: int) -> SolverState:
        history = tensor_list(state, "x0_history", self.order)
        last, this_order, lower = state.get("last_sample"), state.get("this_order"), state.get("lower_order_nums")
        # after k steps: min(k, order) predictions, the last corrected sample from step k-1 on
        consistent = (len(history) == min(index, self.order) and (last is None) == (index == 0)
                      and (last is None or isinstance(last, torch.Tensor))
                      and this_order in range(self.order + 1) and lower == min(index, self.order))
        if not consistent:
            raise SolverError(f"solver state: unipc history does not match step_index {index} "
                              f"({len(history)} predictions, this_order {this_order!r}, lower_order_nums {lower!r})")
        return {"x0_history": history, "last_sample": last, "this_order": this_order, "lower_order_nums": lower}

    def _restore(self, history: SolverState, device: torch.device | str | None) -> None:
        self.x0_history = [moved(t, device) for t in history["x0_history"]]
        self.last_sample = moved(history["last_sample"], device)
        self.this_order, self.lower_order_nums = history["this_order"], history["lower_order_nums"]

    def _coefficients(self, sigma_t: torch.Tensor, sigma_s0: torch.Tensor):
        alpha_t, lambda_t = alpha_lambda(sigma_t)
        _, lambda_s0 = alpha_lambda(sigma_s0)
        h = lambda_t - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        return alpha_t, lambda_s0, h, hh, h_phi_1, b_h

    def _predict(self, k: int, x: torch.Tensor, order: int) -> torch.Tensor:
        sigma_t, sigma_s0 = self.sigmas[k + 1], self.sigmas[k]
        alpha_t, lambda_s0, h, _, h_phi_1, b_h = self._coefficients(sigma_t, sigma_s0)
        m0 = self.x0_history[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            _, lambda_s1 = alpha_lambda(self.sigmas[k - 1])
            rk = (lambda_s1 - lambda_s0) / h
            d1 = (self.x0_history[-2] - m0) / rk
            # the reference fixes rho = 0.5 for the second-order predictor
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t.to(x.dtype)

    def _correct(self, k: int, m_k: torch.Tensor, last: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s0 = self.sigmas[k], self.sigmas[k - 1]
        alpha_t, lambda_s0, h, hh, h_phi_1, b_h = self._coefficients(sigma_t, sigma_s0)
        m0 = self.x0_history[-1]  # m_{k-1}
        x_t = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
        d1_t = m_k - m0
        if self.this_order == 1:
            return (x_t - alpha_t * b_h * (0.5 * d1_t)).to(x.dtype)
        _, lambda_s1 = alpha_lambda(self.sigmas[k - 2])
        rk = (lambda_s1 - lambda_s0) / h
        d1 = (self.x0_history[-2] - m0) / rk
        rhos = _corrector_rhos(rk, hh, b_h, h_phi_1)
        return (x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[1] * d1_t)).to(x.dtype)


def _corrector_rhos(rk: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor, h_phi_1: torch.Tensor) -> torch.Tensor:
    """Solve [[1, 1], [rk, 1]] rho = [phi1/B_h, 2*phi2/B_h] in float32, as the reference's linalg.solve."""
    rks = torch.stack([rk, torch.ones_like(rk)])
    phi_1 = h_phi_1 / hh - 1
    phi_2 = phi_1 / hh - 0.5
    rhs = torch.stack([phi_1 * 1 / b_h, phi_2 * 2 / b_h])
    matrix = torch.stack([torch.ones_like(rks), rks])
    return torch.linalg.solve(matrix, rhs)
