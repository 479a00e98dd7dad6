"""Checkpoint loading (strict, precise errors), released layouts, and pull/verify/list against a local Hub double.

The Hub is the only thing replaced by a double; files, shards and indexes are real files on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.weights import hub as hub_mod
from pipeline.weights.hub import RemoteFile, list_models, main_list, main_pull, main_verify, pull, verify
from pipeline.weights.layouts import INDEX, check_installed, get_family
from pipeline.weights.loader import (
    CheckpointError,
    load_dit,
    load_i2v_experts,
    load_state_dict_from_dir,
    tensor_shapes,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "wan_ref" / "dit_i2v"


@pytest.fixture
def expert_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "high_noise_model"
    shutil.copytree(FIXTURE / "high_noise_model", dest)
    dest.chmod(0o755)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


def _shards(model_dir: Path) -> list[Path]:
    weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
    return [model_dir / s for s in sorted(set(weight_map.values()))]


# ---------------------------------------------------------------------------------------------- loader


def test_loading_consumes_every_key_of_the_index() -> None:
    high, low = load_i2v_experts(FIXTURE, torch.float32, "cpu")
    index_keys = set(json.loads((FIXTURE / "high_noise_model" / INDEX).read_text())["weight_map"])
    assert set(high.state_dict()) == index_keys
    state = load_state_dict_from_dir(FIXTURE / "low_noise_model")
    for key, value in low.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not torch.equal(high.head.head.weight, low.head.head.weight)
    assert not high.training and not any(p.requires_grad for p in high.parameters())


def test_dtype_is_applied_per_tensor() -> None:
    model = load_dit(FIXTURE / "high_noise_model", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = load_file(_shards(FIXTURE / "high_noise_model")[0])
    key = next(iter(ref))
    assert torch.equal(model.state_dict()[key], ref[key].to(torch.bfloat16))


def test_single_safetensors_and_pth_layouts_load_the_same(tmp_path: Path) -> None:
    state = load_state_dict_from_dir(FIXTURE / "high_noise_model")
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(FIXTURE / "high_noise_model" / "config.json", single / "config.json")
    save_file(state, single / "diffusion_pytorch_model.safetensors")
    pth = tmp_path / "pth"
    pth.mkdir()
    torch.save({"state_dict": state}, pth / "weights.pth")
    for source in (single, pth / "weights.pth"):
        loaded = load_state_dict_from_dir(source)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    model = load_dit(single)
    assert torch.equal(model.head.modulation, state["head.modulation"])
    assert tensor_shapes(pth / "weights.pth") == {k: tuple(v.shape) for k, v in state.items()}


def test_truncated_shard_is_named(expert_dir: Path) -> None:
    shard = _shards(expert_dir)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated or corrupt"):
        load_dit(expert_dir)
    assert hub_mod.safetensors_trouble(shard).startswith("truncated")


def test_missing_shard_is_named(expert_dir: Path) -> None:
    shard = _shards(expert_dir)[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard missing; {INDEX} maps \d+ tensors"):
        load_dit(expert_dir)


def test_wrong_shape_names_file_key_and_shapes(expert_dir: Path) -> None:
    shard = _shards(expert_dir)[0]
    tensors = load_file(shard)
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    shape = list(tensors[key].shape)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, shard)
    want = rf"{shard.name}: tensor '{key}' has shape \[{shape[0]}, {shape[1] - 1}\]; expected \[{shape[0]}, {shape[1]}\]"
    with pytest.raises(CheckpointError, match=want):
        load_dit(expert_dir)


def test_missing_and_unexpected_keys_are_named(expert_dir: Path) -> None:
    shard = _shards(expert_dir)[0]
    index = json.loads((expert_dir / INDEX).read_text())
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["blocks.0.surprise"] = torch.zeros(3)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"index lists '{dropped}' here but the shard lacks it"):
        load_dit(expert_dir)
    del index["weight_map"][dropped]
    index["weight_map"]["blocks.0.surprise"] = shard.name
    (expert_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks.0.surprise'"):
        load_dit(expert_dir)
    del index["weight_map"]["blocks.0.surprise"]
    (expert_dir / INDEX).write_text(json.dumps(index))
    del tensors["blocks.0.surprise"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"1 tensors missing from the checkpoint, e.g. {dropped}"):
        load_dit(expert_dir)


def test_missing_config_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: model config missing"):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="no .*index.json and no"):
        load_state_dict_from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- layouts, hub


class LocalHub:
    """Hub double: serves files from a local folder, with the sizes and sha256 the real Hub would list."""

    def __init__(self, root: Path) -> None:
        self.root, self.downloads = root, []

    def list_files(self, repo_id: str) -> list[RemoteFile]:
        out = []
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.root).as_posix()
                big = p.suffix in (".safetensors", ".pth", ".ckpt")
                out.append(RemoteFile(rel, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest() if big else None))
        return out

    def download(self, repo_id: str, path: str, dest: Path) -> Path:
        self.downloads.append(path)
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / path, target)
        return target


@pytest.fixture
def remote_i2v(tmp_path: Path) -> Path:
    """A repo laid out like Wan-AI/Wan2.2-I2V-A14B (tiny DiTs, placeholder T5/VAE/tokenizer) plus extras."""
    root = tmp_path / "remote"
    for expert in ("high_noise_model", "low_noise_model"):
        shutil.copytree(FIXTURE / expert, root / expert)
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    (root / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    (root / "google" / "umt5-xxl" / "special_tokens_map.json").write_text("{}")
    (root / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"t5" * 500)
    (root / "Wan2.1_VAE.pth").write_bytes(b"vae" * 300)
    (root / "assets").mkdir()
    (root / "assets" / "demo.mp4").write_bytes(b"not needed")
    (root / "README.md").write_text("not needed")
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def test_check_installed_names_every_missing_file(tmp_path: Path, remote_i2v: Path) -> None:
    assert check_installed("i2v-A14B", remote_i2v) == []
    shard = _shards(remote_i2v / "low_noise_model")[1]
    shard.unlink()
    (remote_i2v / "Wan2.1_VAE.pth").unlink()
    (remote_i2v / "high_noise_model" / INDEX).unlink()
    missing = check_installed("i2v-A14B", remote_i2v)
    assert missing == ["Wan2.1_VAE.pth", f"high_noise_model/{INDEX}", f"low_noise_model/{shard.name}"]
    assert check_installed("animate-14B", tmp_path / "nowhere")[0].endswith("does not exist)")
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        check_installed("flux", tmp_path)


def test_family_file_patterns() -> None:
    fam = get_family("animate-14B")
    assert fam.repo_id == "Wan-AI/Wan2.2-Animate-14B"
    assert fam.wants("diffusion_pytorch_model-00004-of-00004.safetensors")
    assert fam.wants("relighting_lora.ckpt") and fam.wants("google/umt5-xxl/tokenizer.json")
    assert not fam.wants("process_checkpoint/sam2/sam2_hiera_large.pt") and not fam.wants("README.md")
    i2v = get_family("i2v-A14B")
    assert i2v.wants("high_noise_model/diffusion_pytorch_model-00006-of-00006.safetensors")
    assert not i2v.wants("diffusion_pytorch_model-00001-of-00004.safetensors")


def test_pull_downloads_needed_files_verifies_and_resumes(tmp_path: Path, remote_i2v: Path) -> None:
    dest, lines = tmp_path / "models" / "Wan2.2-I2V-A14B", []
    fake = LocalHub(remote_i2v)
    fetched = pull("i2v-A14B", dest, fake, say=lines.append)
    assert "README.md" not in fetched and "assets/demo.mp4" not in fetched
    assert "google/umt5-xxl/special_tokens_map.json" in fetched
    assert check_installed("i2v-A14B", dest) == [] and verify("i2v-A14B", dest, deep=True) == []
    needed = [f for f in fake.list_files("") if get_family("i2v-A14B").wants(f.path)]
    assert lines[0].startswith(f"i2v-A14B: {len(needed)} files, ")
    assert load_dit(dest / "high_noise_model").config.dim == 64

    # A partial file (wrong size) is fetched again; complete ones are not.
    shard = _shards(dest / "low_noise_model")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    fake.downloads.clear()
    assert pull("i2v-A14B", dest, fake, say=lines.append) == [shard.relative_to(dest).as_posix()]
    assert verify("i2v-A14B", dest, deep=True) == []


def test_verify_reports_size_truncation_and_sha256(tmp_path: Path, remote_i2v: Path) -> None:
    dest = tmp_path / "ckpt"
    pull("i2v-A14B", dest, LocalHub(remote_i2v), say=lambda _: None)
    vae = dest / "Wan2.1_VAE.pth"
    vae.write_bytes(b"x" + vae.read_bytes()[1:])  # same size, different content
    assert verify("i2v-A14B", dest) == []
    assert verify("i2v-A14B", dest, deep=True) == [
        f"Wan2.1_VAE.pth: sha256 {hashlib.sha256(vae.read_bytes()).hexdigest()[:16]}..., the Hub says "
        f"{hashlib.sha256(b'vae' * 300).hexdigest()[:16]}..."
    ]
    (dest / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"short")
    problems = verify("i2v-A14B", dest)
    assert problems == ["models_t5_umt5-xxl-enc-bf16.pth: size 5 bytes, the Hub says 1000"]
    (dest / hub_mod.MANIFEST).unlink()  # without the manifest, truncation still shows in the header
    shard = _shards(dest / "high_noise_model")[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert verify("i2v-A14B", dest)[0].startswith(f"high_noise_model/{shard.name}: truncated")


def test_pull_refuses_a_repo_without_required_files(tmp_path: Path, remote_i2v: Path) -> None:
    (remote_i2v / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(hub_mod.HubError, match="lacks files wanbox needs: Wan2.1_VAE.pth"):
        pull("i2v-A14B", tmp_path / "d", LocalHub(remote_i2v), say=lambda _: None)
    assert main_pull("i2v-A14B", tmp_path / "d", LocalHub(remote_i2v)) == 1


def test_cli_entry_points(tmp_path: Path, remote_i2v: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    assert main_pull("i2v-A14B", models / "Wan2.2-I2V-A14B", LocalHub(remote_i2v)) == 0
    assert main_verify("i2v-A14B", models / "Wan2.2-I2V-A14B", deep=True) == 0
    assert main_verify("animate-14B", models / "Wan2.2-Animate-14B") == 1
    assert main_list(models) == 0
    out = capsys.readouterr().out
    assert "i2v-A14B: OK" in out and "(sha256 checked)" in out
    assert "not installed (wanbox models pull animate-14B)" in out
    listed = {m.family: m for m in list_models(models)}
    assert listed["i2v-A14B"].installed and listed["i2v-A14B"].size_bytes > 1_000_000
    assert not listed["animate-14B"].installed


def test_hub_module_does_not_import_torch() -> None:
    code = "import sys, pipeline.weights.hub, pipeline.weights.layouts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_loader_verify_uses_the_pull_manifest(tmp_path: Path, remote_i2v: Path) -> None:
    dest = tmp_path / "ckpt"
    pull("i2v-A14B", dest, LocalHub(remote_i2v), say=lambda _: None)
    high, _ = load_i2v_experts(dest, verify=True)
    assert high.config.dim == 64
    shard = _shards(dest / "low_noise_model")[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: loads fine, fails sha256
    shard.write_bytes(bytes(data))
    load_i2v_experts(dest)
    with pytest.raises(CheckpointError, match=f"low_noise_model/{shard.name}: sha256"):
        load_i2v_experts(dest, verify=True)


def test_pull_through_the_huggingface_hub_adapter(
    tmp_path: Path, remote_i2v: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default adapter calls HfApi.model_info(files_metadata=True) and hf_hub_download(local_dir=...);
    both are replaced by doubles serving the local repo (no network)."""
    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    listing = LocalHub(remote_i2v).list_files("")
    calls: list[tuple] = []

    class FakeApi:
        def model_info(self, repo_id: str, files_metadata: bool = False):  # noqa: ANN202
            calls.append(("model_info", repo_id, files_metadata))
            siblings = [RepoSibling(f.path, f.size, lfs=BlobLfsInfo(f.size, f.sha256, 134) if f.sha256 else None)
                        for f in listing]
            return type("Info", (), {"siblings": siblings})()

    def fake_download(repo_id: str, filename: str, *, local_dir: Path) -> str:
        calls.append(("download", repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote_i2v / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main_pull("i2v-A14B", tmp_path / "ckpt") == 0
    assert calls[0] == ("model_info", "Wan-AI/Wan2.2-I2V-A14B", True)
    downloaded = {c[2] for c in calls[1:]}
    assert "Wan2.1_VAE.pth" in downloaded and "README.md" not in downloaded
    assert verify("i2v-A14B", tmp_path / "ckpt", deep=True) == []
