"""Noise schedules of the flow-matching solvers: shifted sigmas and the integer timesteps fed to the model.

Pure arithmetic on numbers, mirroring the reference's float64 NumPy set-up; it must not hold solver state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Apply the timestep shift s*sigma / (1 + (s-1)*sigma) in float64, as the reference does."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _unipc_sigma_max() -> float:
    # The UniPC scheduler builds a float32 training table 1 - linspace(1, 1/1000, 1000)[::-1] and starts
    # sampling from its first entry read back as a Python float (0.9990000128746033), hence t0 = 999.
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1].copy()
    return float(np.float32((1.0 - alphas)[0]))


def unipc_sigmas(steps: int, shift: float) -> np.ndarray:
    """Unshifted-then-shifted float64 sigmas of FlowUniPCMultistepScheduler.set_timesteps (no final zero)."""
    sigmas = np.linspace(_unipc_sigma_max(), 0.0, steps + 1).copy()[:-1]
    return shift_sigmas(sigmas, shift)


def dpm_sigmas(steps: int, shift: float) -> np.ndarray:
    """get_sampling_sigmas of the reference: linspace(1, 0) shifted, so sigma0 = 1 and t0 = 1000."""
    sigmas = np.linspace(1, 0, steps + 1)[:steps]
    return shift_sigmas(sigmas, shift)


def explicit_sigmas(timesteps: Sequence[int | float], shift: float) -> np.ndarray:
    """Sigmas for an explicit list of (unshifted) timesteps in (0, 1000], e.g. a 4-step distilled preset."""
    values = np.asarray([float(t) for t in timesteps], dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"timesteps: expected a non-empty list of numbers, got {list(timesteps)!r}")
    if np.any(values <= 0) or np.any(values > NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"timesteps: expected values in (0, {NUM_TRAIN_TIMESTEPS}], got {list(timesteps)!r}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"timesteps: expected a strictly decreasing list, got {list(timesteps)!r}")
    return shift_sigmas(values / NUM_TRAIN_TIMESTEPS, shift)


def to_schedule(sigmas: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps int64 [N] by truncation of sigma*1000, sigmas float32 [N+1] ending with 0)."""
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    with_zero = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return timesteps, torch.from_numpy(with_zero)
