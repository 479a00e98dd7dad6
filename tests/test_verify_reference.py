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
    assert failed == 0 and passed == _expected_case_count(wan_ref) > 30
    lines = done.stdout.strip().splitlines()[:-1]
    assert len(lines) == passed and all(line.split()[-1] == "PASS" for line in lines)
    components = {line.split()[0] for line in lines}
    assert components == {"schedulers", "t5", "vae", "clip", "dit_i2v", "dit_animate", "pipeline_i2v"}


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
    (root / "t5" / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    shard = root / "dit_i2v" / "high_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.unlink()
    assert verify_main([str(root)]) == 1
    done = capsys.readouterr()
    t5_lines = [line for line in done.out.splitlines() if line.startswith("t5")]
    assert len(t5_lines) == 1 and "FAIL" in t5_lines[0] and "models_t5_umt5-xxl-enc-bf16.pth" in t5_lines[0]
    cases = json.loads((root / "dit_i2v" / "cases.json").read_text())["cases"]
    high_names = {c["name"] for c in cases if c["expert"] == "high_noise_model"}
    for line in done.out.splitlines():
        if line.startswith("dit_i2v"):
            name = line.split()[1]
            assert ("FAIL" in line) == (name in high_names), line
            if name in high_names:
                assert "00002-of-00002" in line, line


def test_unknown_components_and_empty_folders_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert verify_main([str(tmp_path / "empty")]) == 1
    assert "no component folders" in capsys.readouterr().err
    (tmp_path / "odd" / "mystery").mkdir(parents=True)
    (tmp_path / "odd" / "mystery" / "cases.json").write_text("{}")
    assert verify_main([str(tmp_path / "odd")]) == 1
    out = capsys.readouterr().out
    assert "unknown component" in out and _counts(out) == (0, 1)
