"""Torch files in the legacy (non-zip) format load like zip ones: T5, VAE and CLIP (the DiT loader had this
already), and the reader tells the two formats apart by their first bytes, with errors naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models.clip import ClipVision
from pipeline.models.t5 import CheckpointError, T5Encoder
from pipeline.models.vae import WanVAE
from pipeline.weights.pth import TorchFileError, load_torch_file

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def legacy_copy(source: Path, folder: Path) -> Path:
    """The same state dict re-saved with torch's pre-1.6 serialisation (a pickle stream, no zip)."""
    out = folder / source.name
    torch.save(torch.load(source, weights_only=True), out, _use_new_zipfile_serialization=False)
    assert not out.read_bytes().startswith(b"PK")  # really the legacy format
    return out


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = list(zip(a.state_dict().items(), b.state_dict().items(), strict=True))
    assert pairs and all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in pairs)


def test_t5_vae_and_clip_load_legacy_files(wan_ref: Path, tmp_path: Path) -> None:
    t5 = legacy_copy(wan_ref / "t5" / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path)
    same_params(T5Encoder.from_checkpoint(t5, config=wan_ref / "t5" / "config.json"),
                T5Encoder.from_checkpoint(wan_ref / "t5" / t5.name, config=wan_ref / "t5" / "config.json"))  # fmt: skip
    vae = legacy_copy(wan_ref / "vae" / "Wan2.1_VAE.pth", tmp_path)
    same_params(WanVAE.from_checkpoint(vae).model, WanVAE.from_checkpoint(wan_ref / "vae" / vae.name).model)
    clip = legacy_copy(wan_ref / "clip" / CLIP_FILE, tmp_path)
    config = wan_ref / "clip" / "config.json"
    same_params(ClipVision.from_checkpoint(clip, config=config).tower,
                ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config=config).tower)  # fmt: skip


def test_reader_errors_name_file_and_format(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_file(tmp_path / "old.pth")["w"], torch.ones(4))
    data = (tmp_path / "old.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-12])
    with pytest.raises(TorchFileError, match=r"cut.pth: cannot read this legacy \(non-zip\) torch file \(\d+ bytes\)"):
        load_torch_file(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(TorchFileError, match=r"empty.pth: the file is empty"):
        load_torch_file(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_bytes(b"hello")
    with pytest.raises(TorchFileError, match=r"text.pth: not a torch.save file \(starts with b'hell'"):
        load_torch_file(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match=r"text.pth: not a readable torch state dict"):
        T5Encoder.from_checkpoint(tmp_path / "text.pth")
