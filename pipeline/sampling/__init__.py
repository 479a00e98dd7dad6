"""Flow-matching sampling: solvers (UniPC, DPM++, Euler), the MoE expert switch and classifier-free guidance.

Built fresh per run through `make_solver`; nothing here loads models or keeps global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from inbox_schema.defaults import SOLVERS  # the names a manifest may give: the contract
from pipeline.sampling.base import FlowSolver, SolverError
from pipeline.sampling.dpmpp import DPMSolverPP
from pipeline.sampling.euler import EulerSolver
from pipeline.sampling.unipc import UniPCSolver

# Each name of the contract's SOLVERS -> its implementation (a test keeps the two lists equal).
SOLVER_CLASSES: dict[str, type[FlowSolver]] = {"unipc": UniPCSolver, "dpm++": DPMSolverPP, "euler": EulerSolver}

__all__ = ["SOLVERS", "SOLVER_CLASSES", "FlowSolver", "SolverError", "make_solver"]


def make_solver(name: str, steps: int, shift: float,
                timesteps: Sequence[int | float] | None = None) -> FlowSolver:
    """A new solver for one run: `name` in SOLVERS, `steps` >= 1, `shift` > 0.

    `timesteps` (Euler only) is an explicit decreasing list of unshifted timesteps in (0, 1000], e.g.
    [1000, 750, 500, 250] for a 4-step distilled model; `steps` must then equal its length.
    """
    _check_arguments(name, steps, shift, timesteps)
    if timesteps is not None:
        return EulerSolver(steps, shift, timesteps)
    return SOLVER_CLASSES[name](steps, shift)


def _check_arguments(name: str, steps: int, shift: float, timesteps: Sequence[int | float] | None) -> None:
    if name not in SOLVERS:
        raise SolverError(f"solver: got {name!r}, expected one of {', '.join(SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SolverError(f"steps: got {steps!r}, expected an integer >= 1")
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise SolverError(f"shift: got {shift!r}, expected a finite number > 0")
    if timesteps is None:
        return
    if name != "euler":
        raise SolverError(f"timesteps: an explicit list needs solver 'euler', got solver {name!r}")
    if len(timesteps) != steps:
        raise SolverError(f"timesteps: {len(timesteps)} values given but steps = {steps}; they must agree")
