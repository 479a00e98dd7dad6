"""The README is the front door: its manifest examples must be valid manifests and its commands real ones.

A README that drifts from the code misleads exactly the user who reads it first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.cli import build_parser
from inbox_schema import parse_manifest_text

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


@pytest.mark.parametrize("block", re.findall(r"```toml\n(.*?)```", TEXT, re.S))
def test_readme_manifest_examples_are_valid(block: str, tmp_path: Path) -> None:
    job = parse_manifest_text(block, "README.md", tmp_path, tmp_path, check_inputs=False)
    assert job.kind in ("i2v", "animate")


def test_every_wanbox_command_the_readme_names_exists() -> None:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # the registered subcommands
    shell_lines = "\n".join(re.findall(r"```sh\n(.*?)```", TEXT, re.S)).splitlines()
    shell = "\n".join(line.split("#", 1)[0] for line in shell_lines)  # comments are prose, not commands
    named = set(re.findall(r"`wanbox ([a-z]+)", TEXT)) | set(re.findall(r"\bwanbox ([a-z]+)", shell))
    assert named, "the README names no wanbox command"
    assert named <= commands, f"README names commands that do not exist: {sorted(named - commands)}"


def test_the_two_commands_are_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in TEXT and "pip install -q torch==2.13.0" in ci
    assert "python -m pytest" in TEXT and "python -m pytest" in ci
    assert "wanbox demo" in TEXT


def test_readme_lora_examples_resolve_to_what_the_readme_says(tmp_path: Path) -> None:
    from pipeline.weights.lora_packs import LIGHTNING_I2V

    blocks = re.findall(r"```toml\n(.*?)```", TEXT, re.S)
    preset = next(b for b in blocks if 'preset = "lightning-4step"' in b)
    job = parse_manifest_text(preset, "README.md", tmp_path, tmp_path, check_inputs=False)
    s = job.sampling
    assert (s.steps, s.guide_scale, s.solver, s.timesteps, s.shift, s.boundary) == (
        4, (1.0, 1.0), "euler", (1000, 750, 500, 250), 5.0, 0.9)  # as its comment says
    assert tuple(lora.file for lora in job.loras) == LIGHTNING_I2V.library_names()  # what `models pull` fetches
    upload = next(b for b in blocks if "watercolor.safetensors" in b)
    (lora,) = parse_manifest_text(upload, "README.md", tmp_path, tmp_path, check_inputs=False).loras
    assert (lora.source, lora.strength, lora.experts) == ("upload", 0.8, ("high_noise", "low_noise"))
    assert "wanbox models pull --lora lightning-i2v-A14B" in TEXT and "precision" in TEXT
