"""`python -m pipeline.verify_reference` on the shared reference fixtures, and on broken copies of them.

Runs the real command as a subprocess; the broken copies are real files changed on purpose.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from pipeline.verify_reference import main as verify_main

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)


def _verify(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.verify_reference", str(directory), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def _counts(output: str) -> tuple[int, int]:
    match = SUMMARY.search(output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def _expected_case_count(root: Path) -> int:
    """One line per case, as each cases.json describes them (pipeline: y_latent, steps, final, video)."""
    total = 0
    for folder in sorted(p for p in root.iterdir() if (p / "cases.json").is_file()):
        cases = json.loads((folder / "cases.json").read_text())
        if folder.name == "schedulers":
            total += len(cases["configs"])
        elif folder.name == "pipeline_i2v":
            total += 3 + len(cases["steps"])
        else:
            total += len(cases["cases"])
    return total


def test_every_reference_case_passes(wan_ref: Path) -> None:
    done = _verify(wan_ref)
    assert done.returncode == 0, done.stdout + done.stderr
    passed, failed = _counts(done.stdout)
    assert failed == 0 and passed == _expected_case_count(wan_ref) > 0
    lines = done.stdout.strip().splitlines()[:-1]
    assert len(lines) == passed and all(line.split()[-1] == "PASS" for line in lines)
    components = {line.split()[0] for line in lines}
    assert components == {p.name for p in wan_ref.iterdir() if (p / "cases.json").is_file()}


def _copy(wan_ref: Path, tmp_path: Path, *components: str) -> Path:
    root = tmp_path / "ref"
    for name in components:
        shutil.copytree(wan_ref / name, root / name)
    return root


def test_a_corrupted_expected_tensor_fails_that_case_only(wan_ref: Path, tmp_path: Path) -> None:
    root = _copy(wan_ref, tmp_path, "t5")
    cases = json.loads((root / "t5" / "cases.json").read_text())["cases"]
    victim = cases[0]["expected"]["trimmed"][0]["key"]
    tensors = load_file(str(root / "t5" / "cases.safetensors"))
    tensors[victim] = tensors[victim] * 1.01  # 1% off: far outside the 1e-4 tolerance
    save_file(tensors, str(root / "t5" / "cases.safetensors"))
    done = _verify(root)
    assert done.returncode == 1
    assert _counts(done.stdout) == (len(cases) - 1, 1)
    failing = [line for line in done.stdout.splitlines() if "FAIL" in line]
    assert len(failing) == 1 and failing[0].split()[:2] == ["t5", cases[0]["name"]]
    assert "rel-L2 9.90e-03" in failing[0]  # |0.01 e| / |1.01 e|


def test_a_missing_model_file_is_reported_with_the_reason(wan_ref: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    root = _copy(wan_ref, tmp_path, "t5", "dit_i2v")
    t5_file = json.loads((root / "t5" / "cases.json").read_text())["checkpoint"]["file"]
    (root / "t5" / t5_file).unlink()
    high = root / "dit_i2v" / "high_noise_model"
    index = json.loads((high / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard_name = sorted(set(index["weight_map"].values()))[-1]
    (high / shard_name).unlink()
    assert verify_main([str(root)]) == 1
    done = capsys.readouterr()
    t5_lines = [line for line in done.out.splitlines() if line.startswith("t5")]
    assert len(t5_lines) == 1 and "FAIL" in t5_lines[0] and t5_file in t5_lines[0]
    cases = json.loads((root / "dit_i2v" / "cases.json").read_text())["cases"]
    high_names = {c["name"] for c in cases if c["expert"] == "high_noise_model"}
    for line in done.out.splitlines():
        if line.startswith("dit_i2v"):
            name = line.split()[1]
            assert ("FAIL" in line) == (name in high_names), line
            if name in high_names:
                assert shard_name in line, line


def test_unknown_components_and_empty_folders_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert verify_main([str(tmp_path / "empty")]) == 1
    assert "no component folders" in capsys.readouterr().err
    (tmp_path / "odd" / "mystery").mkdir(parents=True)
    (tmp_path / "odd" / "mystery" / "cases.json").write_text("{}")
    assert verify_main([str(tmp_path / "odd")]) == 1
    out = capsys.readouterr().out
    assert "unknown component" in out and _counts(out) == (0, 1)


def _pipeline_fixture(root: Path, models_dir: Path) -> int:
    """A pipeline_i2v folder with other sizes, frames, solver and a single guide scale; expected tensors
    from our own run (this checks that the driver reads everything from the folder, not the numbers)."""
    import torch
    from PIL import Image

    from pipeline.i2v import I2VModels, prepare_i2v, sample_i2v
    from pipeline.sampling import make_solver
    from pipeline.sampling.moe import ExpertSwitch

    folder = root / "pipeline_i2v"
    folder.mkdir(parents=True)
    gradient = np.linspace(0, 255, 50 * 30 * 3).reshape(30, 50, 3).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "picture.png")
    call = {"img": "picture.png (PIL RGB)", "max_area": 2000, "frame_num": 5, "shift": 3.0,
            "sample_solver": "dpm++", "sampling_steps": 3, "guide_scale": 2.5, "seed": 5}
    gen = torch.Generator().manual_seed(9)
    tensors = {"context": torch.randn(6, 32, generator=gen), "context_null": torch.randn(4, 32, generator=gen)}
    models = I2VModels.load(models_dir, "cpu", torch.float32, text_encoder=False)
    inputs = prepare_i2v(models, Image.open(folder / "picture.png"), tensors["context"], tensors["context_null"],
                         max_area=call["max_area"], frames=call["frame_num"], seed=call["seed"])
    solver, switch = make_solver("dpm++", 3, 3.0), ExpertSwitch(boundary=0.95, guide_scale=2.5)
    latents: list[torch.Tensor] = []
    final = sample_i2v(models, inputs, solver, switch, on_latent=lambda _i, x: latents.append(x))
    steps = [{"index": i, "t": int(t), "expert": switch.expert(t), "guide_scale": 2.5}
             for i, t in enumerate(solver.timesteps)]
    previous = [inputs.noise, *latents]
    for i in range(3):
        tensors[f"step{i}.latent_in"], tensors[f"step{i}.latent_out"] = previous[i], previous[i + 1]
        t = solver.timesteps[i : i + 1]
        expert = models.expert(switch.expert(t))
        with torch.no_grad():
            cond = expert(previous[i], t, tensors["context"], inputs.seq_len, inputs.y)
            uncond = expert(previous[i], t, tensors["context_null"], inputs.seq_len, inputs.y)
        tensors[f"step{i}.cond"], tensors[f"step{i}.uncond"] = cond, uncond
        tensors[f"step{i}.velocity"] = uncond + 2.5 * (cond - uncond)
    tensors.update(noise=inputs.noise, y_latent=inputs.y[4:], expected_final_latent=final,
                   expected_video=models.vae.decode(final).clamp(-1, 1))
    cases = {"checkpoints": {"ckpt_dir": f"../{models_dir.name}", "vae": f"../{models_dir.name}/Wan2.1_VAE.pth"},
             "call": call, "steps": steps,
             "derived": {"boundary_timestep": 950.0, "num_train_timesteps": 1000},
             "tolerance": {"final_latent_rel_l2": 1e-3, "video_rel_l2": 1e-3, "y_latent_rel_l2": 1e-4,
                           "per_step_rel_l2": 1e-3}}
    (folder / "cases.json").write_text(json.dumps(cases))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / "cases.safetensors"))
    return 3 + len(steps)


def _dit_fixture(root: Path, models_dir: Path) -> int:
    """A dit_i2v folder with the tiny experts (32-wide text), another grid and padding."""
    import torch

    from pipeline.weights.loader import load_dit

    folder = root / "dit_i2v"
    gen = torch.Generator().manual_seed(3)
    tensors, cases = {}, []
    for expert, t_value in (("high_noise_model", 950), ("low_noise_model", 120)):
        shutil.copytree(models_dir / expert, folder / expert)
        name = f"{expert}_grid2x4x6"
        x, y = torch.randn(16, 2, 4, 6, generator=gen), torch.randn(20, 2, 4, 6, generator=gen)
        context, t = torch.randn(5, 32, generator=gen), torch.tensor([t_value])
        with torch.no_grad():
            out = load_dit(folder / expert)(x, t, context, 14, y)
        spec = {k: {"key": f"{name}.{k}"} for k in ("x", "y", "context", "t")}
        tensors.update({f"{name}.x": x, f"{name}.y": y, f"{name}.context": context, f"{name}.t": t,
                        f"{name}.expected": out})
        cases.append({"name": name, "expert": expert, "seq_len": 14, "inputs": spec,
                      "expected": {"out": {"key": f"{name}.expected"}},
                      "tolerance": {"rel_l2": 1e-4, "max_abs": 5e-4}})
    (folder / "cases.json").write_text(json.dumps({"cases": cases}))
    save_file(tensors, str(folder / "cases.safetensors"))
    return len(cases)


def test_other_sizes_frames_solvers_and_grids_come_from_the_folder(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from pipeline.weights.tiny import write_i2v

    root = tmp_path / "other"
    models_dir = write_i2v(root / "tiny_models", seed=2)
    expected = _dit_fixture(root, models_dir) + _pipeline_fixture(root, models_dir)
    assert verify_main([str(root)]) == 0
    out = capsys.readouterr().out
    assert _counts(out) == (expected, 0), out
    tensors = load_file(str(root / "pipeline_i2v" / "cases.safetensors"))
    tensors["expected_video"] = -tensors["expected_video"]
    save_file(tensors, str(root / "pipeline_i2v" / "cases.safetensors"))
    assert verify_main([str(root), "--component", "pipeline_i2v"]) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "FAIL" in line]
    assert len(failing) == 1 and failing[0].split()[:2] == ["pipeline_i2v", "video"]


@pytest.mark.gpu
def test_every_reference_case_passes_on_cuda_in_float32(wan_ref: Path) -> None:
    done = _verify(wan_ref, "--device", "cuda")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(done.stdout) == (_expected_case_count(wan_ref), 0)
