"""Flow-matching solvers against the reference scheduler fixtures, plus MoE switch and guidance behaviour.

Reads every case from fixtures/wan_ref/schedulers/cases.json; must not hard-code the fixture's cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.sampling import SolverError, make_solver
from pipeline.sampling.guidance import SequentialGuidance
from pipeline.sampling.moe import HIGH_NOISE, LOW_NOISE, ExpertSwitch


def _scheduler_cases(wan_ref: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = wan_ref / "schedulers"
    return json.loads((folder / "cases.json").read_text()), load_file(str(folder / "cases.safetensors"))


def _fake_model(meta: dict, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b, c, k = meta["a"], meta["b"], meta["c"], meta["k"]
    return a * x + b * torch.cos(t.to(torch.float32) / 1000) * x0 + c * torch.sin(k * x)


def _rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_every_fixture_case_matches_the_reference_trajectory(wan_ref: Path) -> None:
    cases, tensors = _scheduler_cases(wan_ref)
    meta, tol = cases["fake_model"], cases["tolerance"]
    x0 = tensors[meta["x0_key"]]
    assert cases["configs"]
    for case in cases["configs"]:
        keys = {name: spec["key"] for name, spec in case["tensors"].items()}
        solver = make_solver(case["solver"], case["steps"], case["shift"])
        label = f"{case['solver']} steps={case['steps']} shift={case['shift']}"
        assert torch.equal(solver.timesteps, tensors[keys["timesteps"]]), label
        assert solver.timesteps.tolist() == case["timesteps"], label
        assert float((solver.sigmas - tensors[keys["sigmas"]]).abs().max()) <= 1e-7, label
        latents, outputs = tensors[keys["latents"]], tensors[keys["model_outputs"]]
        x = latents[0].clone()
        for i, t in enumerate(solver.timesteps):
            v = _fake_model(meta, x0, x, t)
            assert _rel_l2(v, outputs[i]) <= tol["model_outputs_rel_l2"], f"{label} step {i} model output"
            x = solver.step(v, t, x)
            assert _rel_l2(x, latents[i + 1]) <= tol["latents_rel_l2_per_step"], f"{label} step {i}"


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_exact_velocity_of_a_straight_path_lands_on_the_data(name: str, steps: int) -> None:
    # x_sigma = (1 - sigma) x0 + sigma * eps has velocity eps - x0 everywhere: every solver must end at x0.
    gen = torch.Generator().manual_seed(steps)
    x0, eps = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    solver = make_solver(name, steps, 5.0)
    x = (1 - solver.sigmas[0]) * x0 + solver.sigmas[0] * eps
    for k in range(solver.num_steps):
        expected = (1 - solver.sigmas[k]) * x0 + solver.sigmas[k] * eps
        assert torch.allclose(x, expected, atol=1e-5), f"step {k}"
        x = solver.step(eps - x0, k, x)
    assert torch.allclose(x, x0, atol=1e-5)


def test_timestep_conventions_differ_between_unipc_and_dpm() -> None:
    assert int(make_solver("unipc", 20, 5.0).timesteps[0]) == 999
    assert int(make_solver("dpm++", 20, 5.0).timesteps[0]) == 1000
    assert make_solver("unipc", 20, 5.0).timesteps[:6].tolist() == [999, 989, 978, 965, 952, 937]
    assert float(make_solver("dpm++", 8, 3.0).sigmas[-1]) == 0.0


def test_euler_with_an_explicit_distilled_schedule() -> None:
    solver = make_solver("euler", 4, 5.0, timesteps=[1000, 750, 500, 250])
    # shifted: 5*0.75/(1+4*0.75) = 0.9375 -> 937; 0.5 -> 0.8333 -> 833; 0.25 -> 0.625 -> 625
    assert solver.timesteps.tolist() == [1000, 937, 833, 625]
    assert solver.sigmas.tolist() == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0])
    plain = make_solver("euler", 3, 1.0, timesteps=[900, 600, 300])
    assert plain.timesteps.tolist() == [900, 600, 300]
    x, v = torch.ones(2), torch.full((2,), 2.0)
    assert torch.allclose(plain.step(v, 0, x), x + (0.6 - 0.9) * v)


def test_steps_must_come_in_order_and_not_beyond_the_end() -> None:
    solver = make_solver("unipc", 2, 5.0)
    x = torch.zeros(3)
    with pytest.raises(SolverError, match="expected 0"):
        solver.step(x, 1, x)
    with pytest.raises(SolverError, match="timestep"):
        solver.step(x, torch.tensor([5]), x)
    solver.step(x, solver.timesteps[0], x)
    solver.step(x, 1, x)
    with pytest.raises(SolverError, match="build a new solver"):
        solver.step(x, 2, x)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("heun", 4, 5.0), {}, "solver: got 'heun'"),
        (("unipc", 0, 5.0), {}, "steps: got 0"),
        (("unipc", 4, -1.0), {}, "shift: got -1.0"),
        (("unipc", 4, 5.0), {"timesteps": [1000, 500, 250, 100]}, "needs solver 'euler'"),
        (("euler", 3, 5.0), {"timesteps": [1000, 500]}, "2 values given but steps = 3"),
        (("euler", 2, 5.0), {"timesteps": [500, 1000]}, "strictly decreasing"),
        (("euler", 2, 5.0), {"timesteps": [1500, 10]}, r"\(0, 1000\]"),
    ],
)
def test_bad_solver_arguments_are_named(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_solver(*args, **kwargs)


def test_expert_switch_follows_the_boundary_and_per_expert_scales() -> None:
    switch = ExpertSwitch(boundary=0.9, guide_scale=(2.0, 4.5))
    assert [switch.expert(t) for t in (999, 900, 899, 833)] == [HIGH_NOISE, HIGH_NOISE, LOW_NOISE, LOW_NOISE]
    assert switch.scale(torch.tensor([908])) == 4.5
    assert switch.scale(torch.tensor([833])) == 2.0
    assert ExpertSwitch(boundary=0.5, guide_scale=3.0).guide_scale == (3.0, 3.0)
    assert ExpertSwitch(boundary=0.5).expert(600) == HIGH_NOISE
    with pytest.raises(ValueError, match="boundary"):
        ExpertSwitch(boundary=900)
    with pytest.raises(ValueError, match="guide_scale"):
        ExpertSwitch(guide_scale=(1.0, 2.0, 3.0))


class _CountingModel:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, latent: torch.Tensor, t: torch.Tensor, *, context: str) -> torch.Tensor:
        self.calls.append(context)
        return latent * (2.0 if context == "cond" else 0.5)


def test_sequential_guidance_mixes_cond_and_uncond_and_skips_uncond_at_scale_one() -> None:
    model, latent, t = _CountingModel(), torch.ones(2, 3), torch.tensor([999])
    v = SequentialGuidance()(model, latent, t, {"context": "cond"}, {"context": "uncond"}, 3.0)
    assert model.calls == ["cond", "uncond"]
    assert torch.allclose(v, torch.full((2, 3), 0.5 + 3.0 * 1.5))
    model.calls.clear()
    v = SequentialGuidance()(model, latent, t, {"context": "cond"}, {"context": "uncond"}, 1.0)
    assert model.calls == ["cond"]
    assert torch.allclose(v, torch.full((2, 3), 2.0))
