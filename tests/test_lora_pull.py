"""`wanbox models pull --lora PACK` fetches a published LoRA set into the LoRA library through the Hub boundary (a local
double serving files with the sizes and sha256 the Hub lists): sizes first, verified, resumable; verify after.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from inbox_schema import parse_manifest_text
from pipeline.weights import hub as hub_mod
from pipeline.weights.hub import HubError, main_pull_loras, main_verify_loras, pull_loras
from pipeline.weights.lora_packs import LIGHTNING_I2V, PACKS
from tests.test_weights import LocalHub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """lightx2v/Wan2.2-Lightning as the Hub lists it: the I2V pair, and files wanbox does not want."""
    root = tmp_path / "remote"
    for i, path in enumerate(LIGHTNING_I2V.files):  # real safetensors files (listed with sha256, as LFS files)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"blocks.0.self_attn.q.lora_down.weight": np.full((4, 300), i, np.float32)}, str(root / path))
    (root / "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1").mkdir()
    (root / "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1" / "high_noise_model.safetensors").write_bytes(b"t2v")
    (root / "README.md").write_text("not needed")
    return root


def test_pull_puts_the_pair_in_the_library_where_manifests_name_it(tmp_path: Path, remote: Path) -> None:
    library, lines = tmp_path / "models" / "loras", []
    fake = LocalHub(remote)
    assert sorted(pull_loras("lightning-i2v-A14B", library, fake, say=lines.append)) == sorted(LIGHTNING_I2V.files)
    assert fake.downloads == list(LIGHTNING_I2V.files)  # only the pair, not the T2V files or the README
    size = sum((remote / f).stat().st_size for f in LIGHTNING_I2V.files) / 1000
    assert lines[0] == (f"lightning-i2v-A14B: 2 files, {size:.1f} KB from lightx2v/Wan2.2-Lightning into "
                        f"{library / 'Wan2.2-Lightning'}")
    names = [line.split('"')[1] for line in lines if "library =" in line]
    assert names == list(LIGHTNING_I2V.library_names())
    text = ('schema = 1\nkind = "i2v"\nprompt = "p"\n[inputs]\nimage = "c.jpg"\n[sampling]\npreset = "lightning-4step"\n'
            + "".join(f'[[lora]]\nlibrary = "{n}"\nexpert = "{e}"\n'
                      for n, e in zip(names, ("high_noise", "low_noise"), strict=True)))
    job = parse_manifest_text(text, "j.toml", tmp_path, check_inputs=False, lora_library=library)
    assert [float(load_file(str(lora.path))["blocks.0.self_attn.q.lora_down.weight"][0, 0]) for lora in job.loras] == [
        0.0, 1.0]
    assert main_verify_loras("lightning-i2v-A14B", library, deep=True) == 0

    # resumable: a partial file is fetched again, a complete one is not
    partial = library / "Wan2.2-Lightning" / LIGHTNING_I2V.files[1]
    whole = partial.read_bytes()
    partial.write_bytes(whole[:100])
    fake.downloads.clear()
    assert pull_loras("lightning-i2v-A14B", library, fake, say=lambda _: None) == [LIGHTNING_I2V.files[1]]
    # a file that differs from the Hub's sha256 fails verification, naming it
    partial.write_bytes(whole[:-1] + b"\x07")
    assert main_verify_loras("lightning-i2v-A14B", library) == 0  # sizes and headers agree ...
    assert main_verify_loras("lightning-i2v-A14B", library, deep=True) == 1  # ... its sha256 does not


def test_pull_refuses_what_it_cannot_verify_and_says_why(tmp_path: Path, remote: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (remote / LIGHTNING_I2V.files[0]).unlink()
    with pytest.raises(HubError, match="lacks files wanbox needs: .*high_noise_model.safetensors"):
        pull_loras("lightning-i2v-A14B", tmp_path / "lib", LocalHub(remote), say=lambda _: None)
    assert main_pull_loras("lightning-i2v-A14B", tmp_path / "lib", LocalHub(remote)) == 1
    assert "lacks files" in capsys.readouterr().err

    class CorruptingHub(LocalHub):
        def download(self, repo_id: str, path: str, dest: Path) -> Path:
            target = super().download(repo_id, path, dest)
            target.write_bytes(target.read_bytes()[:-1] + b"\xff")  # same size, other content
            return target

    save_file({"x": np.zeros(3, np.float32)}, str(remote / LIGHTNING_I2V.files[0]))
    with pytest.raises(HubError, match="failed verification:\n  .*sha256"):
        pull_loras("lightning-i2v-A14B", tmp_path / "lib2", CorruptingHub(remote), say=lambda _: None)
    with pytest.raises(ValueError, match="unknown LoRA pack 'turbo'"):
        pull_loras("turbo", tmp_path, LocalHub(remote))


def test_the_cli_pulls_a_pack_into_the_configured_library(tmp_path: Path, remote: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.cli import main

    monkeypatch.setattr(hub_mod, "HuggingFaceHub", lambda: LocalHub(remote))  # the Hub boundary only
    assert main(["models", "pull", "--lora", "lightning-i2v-A14B", "--root", str(tmp_path)]) == 0
    library = tmp_path / "models" / "loras" / "Wan2.2-Lightning"
    assert all((library / path).is_file() for path in LIGHTNING_I2V.files)
    assert main(["models", "verify", "--lora", "lightning-i2v-A14B", "--root", str(tmp_path), "--deep"]) == 0


def test_the_cli_offers_the_packs_and_does_not_import_torch() -> None:
    from daemon.cli import build_parser

    args = build_parser().parse_args(["models", "pull", "--lora", "lightning-i2v-A14B"])
    assert (args.family, args.lora) == (None, "lightning-i2v-A14B")
    assert set(PACKS) == {"lightning-i2v-A14B", "lightx2v-animate-14B"}
    code = "import sys, daemon.cli, pipeline.weights.hub; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    assert hub_mod.get_pack("lightx2v-animate-14B").folder == "Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v"
