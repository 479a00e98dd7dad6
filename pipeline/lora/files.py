"""Read one published LoRA file from disk: its tensors, its sha256, the format its keys are in, and the
alpha that PEFT-style files keep outside their tensors.

Must not look at a model (binding.py checks the file against one) nor change a tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from inbox_schema import file_sha256
from pipeline.lora.errors import LoraError, some
from pipeline.lora.keys import KeyRef, LoraFormat, parse_keys
from pipeline.weights.pth import TorchFileError, load_torch_file

Tensor = torch.Tensor
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: the LoraConfig as JSON
PEFT_CONFIG = "adapter_config.json"  # beside a PEFT adapter_model.safetensors / .bin


@dataclass(frozen=True)
class PeftScaling:
    """PEFT's scale rule from the adapter config: lora_alpha (per-module alpha_pattern), rsLoRA or not."""

    alpha: float | None = None
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rslora: bool = False

    def scale(self, module: str, rank: int) -> float:
        alpha = next((float(a) for p, a in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", module)),
                     self.alpha if self.alpha is not None else float(rank))  # fmt: skip
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PeftScaling:
        # diffusers prefixes the keys with the component ("transformer.lora_alpha")
        plain = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in config.items()}
        alpha = plain.get("lora_alpha")
        return cls(float(alpha) if isinstance(alpha, (int, float)) else None,
                   dict(plain.get("alpha_pattern") or {}), bool(plain.get("use_rslora", False)))  # fmt: skip


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file as read: every tensor (CPU, as stored), the keys parsed, sha256 of the bytes."""

    path: Path
    sha256: str
    format: LoraFormat
    tensors: Mapping[str, Tensor]
    refs: tuple[KeyRef, ...]
    scaling: PeftScaling = field(default_factory=PeftScaling)

    @property
    def name(self) -> str:
        return self.path.name

    def error(self, detail: str) -> LoraError:
        return LoraError(self.path, detail, self.format.value)


def read_lora(path: str | Path) -> LoraFile:
    """Read `path` (.safetensors, or .ckpt/.pth/.pt/.bin saved by torch, zip or legacy) and parse its keys.

    Raises LoraError for a missing, empty, truncated or unreadable file, for non-float tensors and for keys
    of LoRA kinds this package does not apply (LoHa, LoKr, DoRA scales, lora_mid...)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(path, "LoRA file not found (no such file)")
    if path.stat().st_size == 0:
        raise LoraError(path, "the file is empty (0 bytes); expected a LoRA in safetensors or torch format")
    if path.suffix.lower() not in SUFFIXES:
        raise LoraError(path, f"unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    tensors, config = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_torch(path)
    if not tensors:
        raise LoraError(path, "the file holds no tensors")
    parsed = parse_keys(tensors)
    if parsed.unknown:
        raise LoraError(path, f"{len(parsed.unknown)} keys are of no LoRA kind applied here (lora_down/up, lora_A/B, "
                              f"alpha, diff, diff_b, diff_m): {some(sorted(parsed.unknown))}", parsed.format.value)  # fmt: skip
    odd = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if odd:
        raise LoraError(path, f"tensors must be floating point; {some(odd)} are "
                              f"{tensors[odd[0]].dtype}", parsed.format.value)  # fmt: skip
    config = config or _peft_config_beside(path)
    scaling = PeftScaling.from_config(config) if config else PeftScaling()
    return LoraFile(path, file_sha256(path), parsed.format, tensors, parsed.refs, scaling)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a mapping
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise LoraError(path, f"unreadable safetensors file ({path.stat().st_size} bytes): {exc}; it is "
                              f"truncated or corrupt") from exc  # fmt: skip
    return tensors, _json(path, metadata.get(METADATA_KEY))


def _read_torch(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        state = load_torch_file(path)
    except TorchFileError as exc:
        raise LoraError(path, str(exc).removeprefix(f"{path}: ")) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # relighting_lora.ckpt and trainer checkpoints wrap it
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise LoraError(path, f"expected a dict of named tensors (optionally under 'state_dict'), found "
                              f"{type(state).__name__}")  # fmt: skip
    return state, {}


def _peft_config_beside(path: Path) -> dict[str, Any]:
    """PEFT's save_pretrained layout: adapter_model.safetensors next to adapter_config.json (lora_alpha)."""
    config = path.with_name(PEFT_CONFIG)
    if not path.stem.startswith("adapter_model") or not config.is_file():
        return {}
    return _json(config, config.read_text())


def _json(source: Path, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraError(source, f"the adapter config is not valid JSON ({exc})") from exc
    return value if isinstance(value, dict) else {}
