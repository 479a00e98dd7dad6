"""The released checkpoint layouts wanbox reads: which files of each Hugging Face repo a model family needs.

Each kind's registry entry names its layout here; the list of families is the registry's. Must not import torch
(the supervisor uses it) nor hard-code shard counts (shards come from each index).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from inbox_schema.kinds import kind_for_model, kinds, resolve

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARDS = "diffusion_pytorch_model-*.safetensors"
T5 = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER = "google/umt5-xxl/tokenizer.json"
VAE = "Wan2.1_VAE.pth"
CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
LORA = "relighting_lora.ckpt"


@dataclass(frozen=True)
class Family:
    """A model family: its Hub repo, its usual folder name, the files it needs, and the DiT folders."""

    name: str  # the model id
    repo_id: str
    files: tuple[str, ...]  # required as named
    dit_dirs: tuple[str, ...]  # each holds config.json + INDEX + the shards the index names
    extra_patterns: tuple[str, ...] = ()  # also downloaded when present (tokenizer side files)

    @property
    def folder(self) -> str:
        """Its usual folder name under the models directory (the kind's registry entry says it)."""
        return kind_for_model(self.name).model_folder

    def download_patterns(self) -> tuple[str, ...]:
        dit = tuple(_join(d, n) for d in self.dit_dirs for n in ("config.json", INDEX, SHARDS))
        return (*self.files, *dit, *self.extra_patterns)

    def wants(self, path: str) -> bool:
        """Whether a file of the Hub repo is one wanbox needs."""
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.download_patterns())


I2V_A14B = Family(
    name="i2v-A14B",
    repo_id="Wan-AI/Wan2.2-I2V-A14B",
    files=(T5, TOKENIZER, VAE),
    dit_dirs=("high_noise_model", "low_noise_model"),
    extra_patterns=("google/umt5-xxl/*",),
)

ANIMATE_14B = Family(
    name="animate-14B",
    repo_id="Wan-AI/Wan2.2-Animate-14B",
    files=(T5, TOKENIZER, VAE, CLIP, LORA),
    dit_dirs=("",),
    extra_patterns=("google/umt5-xxl/*",),
)


def families() -> dict[str, Family]:
    """Every registered kind's checkpoint layout, by model id."""
    return {kind.model_id: resolve(kind.layout) for kind in kinds().values()}


def get_family(name: str) -> Family:
    found = families().get(name)
    if found is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families())}")
    return found


def required_files(family: str, ckpt_dir: Path | str) -> list[str]:
    """Every file the family needs under ckpt_dir (relative paths); shards as listed by the indexes present."""
    fam = get_family(family)
    needed = list(fam.files)
    for dit in fam.dit_dirs:
        needed += [_join(dit, "config.json"), _join(dit, INDEX)]
        needed += [_join(dit, shard) for shard in _index_shards(Path(ckpt_dir) / dit / INDEX)]
    return needed


def check_installed(family: str, ckpt_dir: Path | str) -> list[str]:
    """The files (relative to ckpt_dir) that a job of this family would miss; [] when installed.

    A missing or unreadable shard index is itself reported (its shards cannot be known without it).
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return [f"{root} (the checkpoint directory itself does not exist)"]
    missing = [rel for rel in required_files(family, root) if not (root / rel).is_file()]
    for dit in get_family(family).dit_dirs:
        index = root / dit / INDEX
        if index.is_file() and not _index_shards(index):
            missing.append(f"{_join(dit, INDEX)} (unreadable: no weight_map)")
    return missing


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name
