"""`python -m pipeline.verify_reference DIR`: run our models, solvers and I2V pipeline on reference fixtures.

Every size, seed, grid, step count and tolerance comes from DIR's cases.json files and tensors; it must
not assume the values of any particular fixture set, and it never changes the fixtures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPONENTS = ("schedulers", "t5", "vae", "clip", "dit_i2v", "dit_animate", "pipeline_i2v")


@dataclass
class CaseResult:
    """One printed line: component, case, worst rel-L2 and max-abs over the case's tensors, verdict."""

    component: str
    case: str
    rel_l2: float | None
    max_abs: float | None
    passed: bool
    note: str = ""

    def line(self) -> str:
        rel = "-" if self.rel_l2 is None else f"{self.rel_l2:.2e}"
        mab = "-" if self.max_abs is None else f"{self.max_abs:.2e}"
        verdict = "PASS" if self.passed else "FAIL"
        text = f"{self.component:<13} {self.case:<34} rel-L2 {rel:>9}  max-abs {mab:>9}  {verdict}"
        return f"{text}  {self.note}" if self.note else text


class CannotRun(Exception):
    """A component or case cannot be run (missing file, missing tensor, missing implementation)."""


# ---------------------------------------------------------------------------------------------- comparison


def measure(actual: torch.Tensor, expected: torch.Tensor, label: str) -> tuple[float, float]:
    """(rel-L2, max-abs) in float64; a shape mismatch is an error naming the tensor."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise CannotRun(f"{label}: shape {list(actual.shape)}, expected {list(expected.shape)}")
    diff = actual.detach().to("cpu", torch.float64) - expected.to(torch.float64)
    norm = float(expected.to(torch.float64).norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    return rel, float(diff.abs().max()) if diff.numel() else 0.0


@dataclass
class Tolerance:
    rel_l2: float
    max_abs: float | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Tolerance:
        return cls(float(raw["rel_l2"]), float(raw["max_abs"]) if "max_abs" in raw else None)


def judge(component: str, case: str, pairs: list[tuple[str, torch.Tensor, torch.Tensor]],
          tol: Tolerance, notes: list[str] | None = None) -> CaseResult:
    """Worst metrics over (label, actual, expected) pairs; fails when any pair exceeds the tolerance."""
    worst_rel, worst_abs, failing = 0.0, 0.0, list(notes or [])
    for label, actual, expected in pairs:
        rel, mab = measure(actual, expected, label)
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, mab)
        over_abs = tol.max_abs is not None and mab > tol.max_abs
        if not (rel <= tol.rel_l2) or over_abs:  # "not <=" also catches NaN
            failing.append(f"{label} rel-L2 {rel:.2e} / max-abs {mab:.2e} over {_tol_text(tol)}")
    return CaseResult(component, case, worst_rel, worst_abs, not failing, "; ".join(failing[:3]))


def _tol_text(tol: Tolerance) -> str:
    return f"rel-L2 {tol.rel_l2:g}" + (f", max-abs {tol.max_abs:g}" if tol.max_abs is not None else "")


# ---------------------------------------------------------------------------------------------- fixture files


class Fixture:
    """One component folder: its cases.json and the tensors of cases.safetensors (inputs go to `device`)."""

    def __init__(self, folder: Path, device: torch.device | None = None) -> None:
        self.folder = folder
        self.device = device or torch.device("cpu")
        self.cases = _read_json(folder / "cases.json")
        tensors = folder / "cases.safetensors"
        if not tensors.is_file():
            raise CannotRun(f"{tensors} is missing")
        from safetensors.torch import load_file

        self.tensors = load_file(str(tensors))

    def tensor(self, spec: Mapping[str, Any] | str) -> torch.Tensor:
        key = spec if isinstance(spec, str) else spec["key"]
        if key not in self.tensors:
            raise CannotRun(f"tensor {key!r} is missing from {self.folder / 'cases.safetensors'}")
        return self.tensors[key]

    def input(self, spec: Mapping[str, Any] | str) -> torch.Tensor:
        return self.tensor(spec).to(self.device)

    def file(self, name: str) -> Path:
        path = (self.folder / name).resolve()
        if not path.exists():
            raise CannotRun(f"{self.folder / name} is missing")
        return path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CannotRun(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CannotRun(f"{path} is not valid JSON: {err}") from err


def _first_word(text: str) -> str:
    """'../dit_i2v (high_noise_model/, ...)' -> '../dit_i2v': cases.json names files before comments."""
    return text.split()[0]


def run_cases(component: str, cases: list[dict[str, Any]],
              check: Callable[[dict[str, Any]], list[CaseResult] | CaseResult]) -> Iterator[CaseResult]:
    """Run each case; an exception fails that case (with the reason) and the others still run."""
    for case in cases:
        name = str(case.get("name", "?"))
        try:
            outcome = check(case)
        except Exception as err:  # a broken case must not hide the others' results
            yield CaseResult(component, name, None, None, False, _reason(err))
            continue
        yield from outcome if isinstance(outcome, list) else [outcome]


def _reason(err: BaseException) -> str:
    if isinstance(err, CannotRun):
        return f"cannot run: {err}"
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"error: {type(err).__name__}: {err}{place}"


# ---------------------------------------------------------------------------------------------- schedulers


def check_schedulers(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.sampling import make_solver

    fx = Fixture(folder)  # solver arithmetic is host-side float32 0-dim math whatever the device
    meta, tol = fx.cases["fake_model"], fx.cases["tolerance"]
    x0 = fx.tensor(meta["x0_key"])
    sigma_tol = _number_in(tol.get("sigmas", "1e-7"))
    step_tol = Tolerance(float(tol["latents_rel_l2_per_step"]))
    out_tol = float(tol.get("model_outputs_rel_l2", tol["latents_rel_l2_per_step"]))

    def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (meta["a"] * x + meta["b"] * torch.cos(t.to(torch.float32) / 1000) * x0
                + meta["c"] * torch.sin(meta["k"] * x))

    def check(config: dict[str, Any]) -> CaseResult:
        name = f"{config['solver']}.steps{config['steps']}.shift{config['shift']:g}"
        spec = config["tensors"]
        solver = make_solver(config["solver"], int(config["steps"]), float(config["shift"]))
        notes = _schedule_notes(solver, fx.tensor(spec["timesteps"]), fx.tensor(spec["sigmas"]), sigma_tol)
        latents, outputs = fx.tensor(spec["latents"]), fx.tensor(spec["model_outputs"])
        pairs, x = [], latents[0].clone()
        for i, t in enumerate(solver.timesteps):
            v = fake_model(x, t)
            if measure(v, outputs[i], f"model_output[{i}]")[0] > out_tol:
                notes.append(f"model output {i} differs (the trajectory drifted before step {i})")
            x = solver.step(v, i, x)
            pairs.append((f"latent[{i + 1}]", x, latents[i + 1]))
        return judge("schedulers", name, pairs, step_tol, notes)

    configs = [dict(c, name=f"{c['solver']}.steps{c['steps']}") for c in fx.cases["configs"]]
    yield from run_cases("schedulers", configs, check)


def _number_in(text: Any) -> float:
    match = re.search(r"[0-9.]+(?:e-?[0-9]+)?", str(text))
    return float(match.group(0)) if match else 1e-7


def _schedule_notes(solver: Any, timesteps: torch.Tensor, sigmas: torch.Tensor, sigma_tol: float) -> list[str]:
    notes = []
    if not torch.equal(solver.timesteps, timesteps.to(torch.int64)):
        notes.append(f"timesteps {solver.timesteps.tolist()[:6]}... expected {timesteps.tolist()[:6]}...")
    if solver.sigmas.shape != sigmas.shape or float((solver.sigmas - sigmas).abs().max()) > sigma_tol:
        notes.append(f"sigmas differ by more than {sigma_tol:g}")
    return notes


# ---------------------------------------------------------------------------------------------- T5


def check_t5(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.models.t5 import T5Encoder

    fx = Fixture(folder, device)
    config = folder / "config.json"
    model = T5Encoder.from_checkpoint(fx.file(fx.cases["checkpoint"]["file"]),
                                      config=config if config.is_file() else None, device=device)

    def check(case: dict[str, Any]) -> CaseResult:
        ids, mask = fx.tensor(case["inputs"]["ids"]), fx.tensor(case["inputs"]["mask"])
        got = model.encode(ids, mask)
        expected = [fx.tensor(spec) for spec in case["expected"]["trimmed"]]
        if len(got) != len(expected):
            raise CannotRun(f"{len(got)} outputs for {len(expected)} expected samples")
        pairs = [(f"trimmed[{i}]", g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True))]
        return judge("t5", case["name"], pairs, Tolerance.of(case["tolerance"]))

    yield from run_cases("t5", fx.cases["cases"], check)


# ---------------------------------------------------------------------------------------------- VAE


def check_vae(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.models.vae import WanVAE

    fx = Fixture(folder, device)
    vae = WanVAE.from_checkpoint(fx.file(fx.cases["checkpoint"]["file"]), device=device)

    def check(case: dict[str, Any]) -> CaseResult:
        tol = Tolerance.of(case["tolerance"])
        with torch.no_grad():
            if case["kind"] == "encode":
                got = vae.encode(fx.input(case["inputs"]["video"]))
                return judge("vae", case["name"], [("latent", got, fx.tensor(case["expected"]["latent"]))], tol)
            if case["kind"] == "decode":
                got = vae.decode(fx.input(case["inputs"]["latent"])).clamp(-1, 1)
                return judge("vae", case["name"], [("video", got, fx.tensor(case["expected"]["video"]))], tol)
        raise CannotRun(f"unknown case kind {case['kind']!r}; expected 'encode' or 'decode'")

    yield from run_cases("vae", fx.cases["cases"], check)


# ---------------------------------------------------------------------------------------------- CLIP


def check_clip(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.models.clip import ClipVision

    fx = Fixture(folder, device)
    config = folder / "config.json"
    clip = ClipVision.from_checkpoint(fx.file(fx.cases["checkpoint"]["file"]),
                                      config=config if config.is_file() else None, device=device)

    def check(case: dict[str, Any]) -> CaseResult:
        with torch.no_grad():
            got = clip(fx.input(case["inputs"]["image"]))
        expected = fx.tensor(case["expected"]["features"])
        return judge("clip", case["name"], [("features", got.reshape(expected.shape), expected)],
                     Tolerance.of(case["tolerance"]))

    yield from run_cases("clip", fx.cases["cases"], check)


# ---------------------------------------------------------------------------------------------- DiTs


def check_dit_i2v(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.weights.loader import load_dit

    fx = Fixture(folder, device)
    experts: dict[str, torch.nn.Module] = {}

    def check(case: dict[str, Any]) -> CaseResult:
        name = case["expert"]
        if name not in experts:
            experts[name] = load_dit(fx.file(name), device=device)
        inputs = {k: fx.input(spec) for k, spec in case["inputs"].items()}
        with torch.no_grad():
            got = experts[name](inputs["x"], inputs["t"], inputs["context"], int(case["seq_len"]), inputs["y"])
        expected = fx.tensor(case["expected"]["out"])
        return judge("dit_i2v", case["name"], [("out", got, expected)], Tolerance.of(case["tolerance"]))

    yield from run_cases("dit_i2v", fx.cases["cases"], check)


def check_dit_animate(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    from pipeline.weights.loader import load_animate_dit

    fx = Fixture(folder, device)
    model = load_animate_dit(fx.file(fx.cases["checkpoint"]["folder"]), device=device)

    def check(case: dict[str, Any]) -> CaseResult:
        inputs = {k: fx.input(spec) for k, spec in case["inputs"].items()}
        with torch.no_grad():
            got = model(inputs["x"], inputs["t"], inputs["context"], int(case["seq_len"]), inputs["y"],
                        clip_fea=inputs.get("clip_fea"), pose_latents=inputs["pose_latents"],
                        face_pixel_values=inputs["face_pixel_values"])
        expected = fx.tensor(case["expected"]["out"])
        return judge("dit_animate", case["name"], [("out", got, expected)], Tolerance.of(case["tolerance"]))

    yield from run_cases("dit_animate", fx.cases["cases"], check)


# ---------------------------------------------------------------------------------------------- I2V pipeline


def check_pipeline_i2v(folder: Path, device: torch.device) -> Iterator[CaseResult]:
    fx = Fixture(folder, device)
    models = _pipeline_models(fx)
    yield from PipelineCheck(fx, models).run()


def _pipeline_models(fx: Fixture) -> Any:
    from pipeline.i2v import I2VModels
    from pipeline.models.vae import WanVAE
    from pipeline.weights.loader import load_i2v_experts

    sources = fx.cases["checkpoints"]
    high, low = load_i2v_experts(fx.file(_first_word(sources["ckpt_dir"])), device=fx.device)
    vae = WanVAE.from_checkpoint(fx.file(_first_word(sources["vae"])), device=fx.device)
    return I2VModels(high, low, vae, None, fx.device, torch.float32)


class _RecordingGuidance:
    """The sequential guidance, keeping each step's cond/uncond/velocity and input latent for comparison."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor | float]] = []

    def __call__(self, model: Any, latent: torch.Tensor, t: torch.Tensor, cond_kwargs: Mapping[str, Any],
                 uncond_kwargs: Mapping[str, Any], scale: float) -> torch.Tensor:
        from pipeline.sampling.guidance import mix

        cond = model(latent, t, **cond_kwargs)
        uncond = model(latent, t, **uncond_kwargs)
        velocity = mix(cond, uncond, scale)
        self.steps.append({"latent_in": latent, "cond": cond, "uncond": uncond, "velocity": velocity,
                           "t": float(t.reshape(-1)[0]), "scale": scale})
        return velocity


class PipelineCheck:
    """Runs our I2V pipeline with the fixture's call, noise and embeddings; compares every stage."""

    def __init__(self, fx: Fixture, models: Any) -> None:
        self.fx, self.models = fx, models
        self.call, self.tol = fx.cases["call"], fx.cases["tolerance"]

    def run(self) -> Iterator[CaseResult]:
        from PIL import Image

        from pipeline.i2v import decode_video, prepare_i2v, sample_i2v
        from pipeline.sampling import make_solver
        from pipeline.sampling.moe import ExpertSwitch

        fx, call = self.fx, self.call
        with Image.open(fx.file(_first_word(call["img"]))) as img:
            image = img.convert("RGB")
        inputs = prepare_i2v(self.models, image, fx.tensor("context"), fx.tensor("context_null"),
                             max_area=int(call["max_area"]), frames=int(call["frame_num"]),
                             seed=int(call["seed"]), noise=fx.tensor("noise"))
        y_tol = Tolerance(float(self.tol["y_latent_rel_l2"]))
        yield judge("pipeline_i2v", "y_latent", [("y_latent", inputs.y[4:], fx.tensor("y_latent"))], y_tol)
        solver = make_solver(call["sample_solver"], int(call["sampling_steps"]), float(call["shift"]))
        switch = ExpertSwitch(boundary=self._boundary(), guide_scale=call["guide_scale"])
        guidance, latents = _RecordingGuidance(), []
        final = sample_i2v(self.models, inputs, solver, switch, guidance=guidance,
                           on_latent=lambda _i, x: latents.append(x))
        yield from self._steps(guidance.steps, latents, solver, switch)
        final_tol = Tolerance(float(self.tol["final_latent_rel_l2"]))
        yield judge("pipeline_i2v", "final_latent", [("final", final, fx.tensor("expected_final_latent"))], final_tol)
        video = decode_video(self.models, final)
        video_tol = Tolerance(float(self.tol["video_rel_l2"]))
        yield judge("pipeline_i2v", "video", [("video", video, fx.tensor("expected_video"))], video_tol)

    def _boundary(self) -> float:
        derived = self.fx.cases.get("derived", {})
        train = float(derived.get("num_train_timesteps", 1000))
        return float(derived.get("boundary_timestep", 0.9 * train)) / train

    def _steps(self, recorded: list[dict[str, Any]], latents: list[torch.Tensor], solver: Any,
               switch: Any) -> Iterator[CaseResult]:
        tol = Tolerance(float(self.tol["per_step_rel_l2"]))
        planned = self.fx.cases.get("steps", [])
        for i, step in enumerate(recorded):
            notes = _plan_notes(planned[i] if i < len(planned) else None, int(solver.timesteps[i]), switch)
            pairs = [(f"step{i}.{name}", step[name], self.fx.tensor(f"step{i}.{name}"))
                     for name in ("latent_in", "cond", "uncond", "velocity")]
            pairs.append((f"step{i}.latent_out", latents[i], self.fx.tensor(f"step{i}.latent_out")))
            yield judge("pipeline_i2v", f"step{i}", pairs, tol, notes)


def _plan_notes(plan: dict[str, Any] | None, t: int, switch: Any) -> list[str]:
    """The fixture's per-step table (t, expert, guide scale) against our schedule and expert switch."""
    if plan is None:
        return []
    notes = []
    if "t" in plan and int(plan["t"]) != t:
        notes.append(f"t {t}, expected {plan['t']}")
    if "expert" in plan and switch.expert(t) != plan["expert"]:
        notes.append(f"expert {switch.expert(t)}, expected {plan['expert']}")
    if "guide_scale" in plan and not math.isclose(switch.scale(t), float(plan["guide_scale"])):
        notes.append(f"guide scale {switch.scale(t)}, expected {plan['guide_scale']}")
    return notes


# ---------------------------------------------------------------------------------------------- driver

CHECKS: dict[str, Callable[[Path, torch.device], Iterator[CaseResult]]] = {
    "schedulers": check_schedulers,
    "t5": check_t5,
    "vae": check_vae,
    "clip": check_clip,
    "dit_i2v": check_dit_i2v,
    "dit_animate": check_dit_animate,
    "pipeline_i2v": check_pipeline_i2v,
}


def components_in(root: Path) -> list[str]:
    """Known components present (in dependency order), then unknown folders that carry a cases.json."""
    known = [name for name in COMPONENTS if (root / name).is_dir()]
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in CHECKS
                     and (p / "cases.json").is_file())
    return known + unknown


def verify_component(root: Path, name: str, device: torch.device) -> Iterator[CaseResult]:
    """All results of one component; a component that cannot start yields one failing line saying why."""
    if name not in CHECKS:
        yield CaseResult(name, "(component)", None, None, False,
                         f"cannot run: unknown component; known: {', '.join(COMPONENTS)}")
        return
    try:
        yield from CHECKS[name](root / name, device)
    except Exception as err:  # setup failed (missing model file, missing implementation, bad cases.json)
        yield CaseResult(name, "(component)", None, None, False, _reason(err))


def verify(root: Path, only: list[str] | None = None, echo: Callable[[str], None] = print,
           device: str | torch.device = "cpu") -> list[CaseResult]:
    results: list[CaseResult] = []
    for name in only or components_in(root):
        for result in verify_component(root, name, torch.device(device)):
            echo(result.line())
            results.append(result)
    return results


def _exact_cuda(attention: str) -> None:
    """The fixtures are float32 results: no TF32 matmuls, and by default the float32 attention path."""
    from pipeline.models.attention import set_backend

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    set_backend(attention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify_reference",
                                     description="Compare our implementation with reference fixtures.")
    parser.add_argument("directory", type=Path, help="folder laid out like fixtures/wan_ref")
    parser.add_argument("--component", action="append", choices=COMPONENTS,
                        help="check only this component (repeatable)")
    parser.add_argument("--device", default="cpu",
                        help="run the models here, e.g. cuda (float32, TF32 off, exact attention by default)")
    parser.add_argument("--attention", default=None,
                        help="CUDA attention kernel (auto|cudnn|flash|fa3|math); fused kernels compute in bf16 "
                             "and will not meet the float32 tolerances")
    args = parser.parse_args(argv)
    root: Path = args.directory
    if not root.is_dir():
        print(f"{root}: not a directory; expected a fixture folder with component subfolders", file=sys.stderr)
        return 1
    if not args.component and not components_in(root):
        print(f"{root}: no component folders found; expected some of {', '.join(COMPONENTS)}", file=sys.stderr)
        return 1
    torch.manual_seed(0)  # nothing here should depend on it; fixed so that reruns print the same numbers
    device = torch.device(args.device)
    if device.type == "cuda":
        _exact_cuda(args.attention or "math")
    results = verify(root, args.component, device=device)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
