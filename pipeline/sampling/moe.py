"""The two-expert (MoE) switch of Wan2.2 A14B: which expert and which guide scale serve timestep t.

Decides only; it must not load, move or run models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.sampling.schedule import NUM_TRAIN_TIMESTEPS

HIGH_NOISE = "high_noise_model"
LOW_NOISE = "low_noise_model"


@dataclass(frozen=True)
class ExpertSwitch:
    """`boundary` is a fraction of the 1000 training timesteps (0.9 -> t >= 900 uses the high-noise expert).

    `guide_scale` is (low-noise scale, high-noise scale), index order as in the reference config.
    """

    boundary: float = 0.9
    guide_scale: tuple[float, float] = (3.5, 3.5)

    def __post_init__(self) -> None:
        if not 0.0 <= self.boundary <= 1.0:
            raise ValueError(f"boundary: got {self.boundary!r}, expected a fraction in [0, 1], e.g. 0.9")
        object.__setattr__(self, "guide_scale", as_guide_pair(self.guide_scale))

    @property
    def boundary_timestep(self) -> float:
        return self.boundary * NUM_TRAIN_TIMESTEPS

    def is_high_noise(self, t: int | torch.Tensor) -> bool:
        value = t.item() if isinstance(t, torch.Tensor) else t
        return value >= self.boundary_timestep

    def expert(self, t: int | torch.Tensor) -> str:
        return HIGH_NOISE if self.is_high_noise(t) else LOW_NOISE

    def scale(self, t: int | torch.Tensor) -> float:
        return self.guide_scale[1] if self.is_high_noise(t) else self.guide_scale[0]


def as_guide_pair(guide_scale: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """One number -> the same for both experts; a pair stays (low-noise, high-noise)."""
    if isinstance(guide_scale, (int, float)) and not isinstance(guide_scale, bool):
        return float(guide_scale), float(guide_scale)
    pair = tuple(guide_scale)
    if len(pair) != 2 or not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in pair):
        raise ValueError(f"guide_scale: got {guide_scale!r}, expected a number or (low_noise, high_noise)")
    return float(pair[0]), float(pair[1])
