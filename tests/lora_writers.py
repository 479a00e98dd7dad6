"""Tiny LoRA files for the tiny fixture DiTs, written in every published layout, and the weights they must give.

Not a test module. The key names here are written out from the public converters' conventions independently
of pipeline/lora/keys.py (the diffusers names below are diffusers' own), so that the reader is checked
against them, not against itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

Tensor = torch.Tensor
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "wan_ref"

# Our module -> diffusers' name (diffusers scripts/convert_wan_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT)
DIFFUSERS_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "modulation": "scale_shift_table",
    "head.modulation": "scale_shift_table", "patch_embedding": "patch_embedding",
}  # fmt: skip
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip


@dataclass
class Pair:
    module: str
    down: Tensor  # [rank, in] (conv: [rank, in, *kernel])
    up: Tensor  # [out, rank] (conv: [out, rank, 1, 1, 1])
    alpha: float | None = None  # None: alpha = rank (scale 1); writers without alpha keys put it in a config


@dataclass
class Diff:
    param: str  # our parameter name
    tensor: Tensor
    kind: str = "diff"  # diff | diff_b | diff_m


@dataclass
class TinyLora:
    pairs: list[Pair]
    diffs: list[Diff] = field(default_factory=list)


def diffusers_name(module: str) -> str:
    block = module.split(".", 2)
    if block[0] == "blocks":
        return f"blocks.{block[1]}.{DIFFUSERS_NAMES[block[2]]}"
    return DIFFUSERS_NAMES[module]


def make_lora(model: nn.Module, modules: list[str], rank: int, seed: int, alpha: float | None = None,
              diffs: list[tuple[str, str]] = ()) -> TinyLora:  # fmt: skip
    """Random pairs on `modules` (Linear or the patch-embedding conv) and full diffs (param, kind)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for module in modules:
        w = model.get_submodule(module).weight
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.2
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=gen) * 0.2
        pairs.append(Pair(module, down, up, alpha))
    params = dict(model.named_parameters())
    out = [Diff(p, torch.randn(params[p].shape, generator=gen) * 0.05, kind) for p, kind in diffs]
    return TinyLora(pairs, out)


def expected(model: nn.Module, loras: list[tuple[TinyLora, float]]) -> dict[str, Tensor]:
    """W + strength * (alpha / rank) * B @ A (+ strength * diff), by hand in float32, for every parameter."""
    want = {name: p.detach().clone().float() for name, p in model.named_parameters()}
    for lora, strength in loras:
        for pair in lora.pairs:
            rank = pair.down.shape[0]
            alpha = pair.alpha if pair.alpha is not None else rank
            w = want[f"{pair.module}.weight"]
            product = pair.up.reshape(pair.up.shape[0], rank) @ pair.down.reshape(rank, -1)
            want[f"{pair.module}.weight"] = w + strength * (alpha / rank) * product.reshape(w.shape)
        for diff in lora.diffs:
            want[diff.param] = want[diff.param] + strength * diff.tensor
    return want


# ---------------------------------------------------------------------------------------------- layouts


def _diff_key(diff: Diff, prefix: str) -> str:
    module, leaf = diff.param.rsplit(".", 1)
    if diff.kind == "diff_b":
        assert leaf == "bias"
        return f"{prefix}{module}.diff_b"
    if diff.kind == "diff_m":
        assert leaf == "modulation"
        return f"{prefix}{module}.diff_m"
    return f"{prefix}{module}.diff" if leaf == "weight" else f"{prefix}{diff.param}.diff"


def write_original(path: Path, lora: TinyLora, prefix: str = "diffusion_model.", ab: bool = False) -> Path:
    """ComfyUI / LightX2V layout: <prefix><module>.lora_down/lora_up (or lora_A/lora_B) + .alpha + diffs.
    .safetensors or, by suffix, a torch file (a legacy non-zip one when the suffix is .pth)."""
    down, up = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    state: dict[str, Tensor] = {}
    for pair in lora.pairs:
        state[f"{prefix}{pair.module}.{down}.weight"] = pair.down
        state[f"{prefix}{pair.module}.{up}.weight"] = pair.up
        if pair.alpha is not None:
            state[f"{prefix}{pair.module}.alpha"] = torch.tensor(float(pair.alpha))
    for diff in lora.diffs:
        state[_diff_key(diff, prefix)] = diff.tensor
    return _save(path, state)


def write_kohya(path: Path, lora: TinyLora) -> Path:
    """musubi-tuner / sd-scripts: lora_unet_<module with underscores>.lora_down.weight + .alpha."""
    state: dict[str, Tensor] = {}
    for pair in lora.pairs:
        name = "lora_unet_" + pair.module.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = pair.down, pair.up
        state[f"{name}.alpha"] = torch.tensor(float(pair.alpha if pair.alpha is not None else pair.down.shape[0]))
    for diff in lora.diffs:  # kohya-named diffs (as sd-scripts' LyCORIS "full" modules): same suffixes
        module, suffix = _diff_key(diff, "").rsplit(".", 1)
        state[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = diff.tensor
    return _save(path, state)


def write_diffusers(path: Path, lora: TinyLora, alpha: float, rank: int) -> Path:
    """diffusers' save_lora_weights: transformer.<diffusers name>.lora_A/lora_B.weight, bias diffs as
    lora_B.bias, the alpha in the safetensors metadata (lora_adapter_metadata, 'transformer.' prefixed)."""
    state: dict[str, Tensor] = {}
    for pair in lora.pairs:
        name = "transformer." + diffusers_name(pair.module)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = pair.down, pair.up
    for diff in lora.diffs:
        if diff.kind == "diff_b":  # PEFT's lora_bias is scaled like its pair: store diff / (alpha / rank)
            module = diff.param.removesuffix(".bias")
            state[f"transformer.{diffusers_name(module)}.lora_B.bias"] = diff.tensor * (rank / alpha)
        else:  # a weight (`.diff` on the module) or a parameter named directly (scale_shift_table)
            target = diff.param.removesuffix(".weight")
            state[f"transformer.{diffusers_name(target)}.diff"] = diff.tensor
    meta = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.use_rslora": False}
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def write_peft_ckpt(path: Path, lora: TinyLora) -> Path:
    """Animate's relighting_lora.ckpt: torch.save({'state_dict': {'<module>.lora_A.default.weight': ...}})."""
    state = {}
    for pair in lora.pairs:
        state[f"{pair.module}.lora_A.default.weight"] = pair.down
        state[f"{pair.module}.lora_B.default.weight"] = pair.up
    torch.save({"state_dict": state}, path)
    return path


def write_peft_dir(folder: Path, lora: TinyLora, alpha: float) -> Path:
    """PEFT save_pretrained: adapter_model.safetensors (base_model.model.<module>.lora_A.weight) beside
    adapter_config.json (lora_alpha)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for pair in lora.pairs:
        state[f"base_model.model.{pair.module}.lora_A.weight"] = pair.down
        state[f"base_model.model.{pair.module}.lora_B.weight"] = pair.up
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": alpha, "peft_type": "LORA"}))
    return _save(folder / "adapter_model.safetensors", state)


def _save(path: Path, state: dict[str, Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=path.suffix != ".pth")
    return path


def forward_inputs(model: nn.Module, seed: int = 0) -> dict:
    """Seeded inputs for one forward of the tiny I2V fixture expert (3x6x8 latent, 36 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(x=torch.randn(16, 3, 6, 8, generator=gen), t=torch.tensor([700]),
                context=torch.randn(7, cfg.text_dim, generator=gen), seq_len=36,
                y=torch.randn(cfg.in_dim - 16, 3, 6, 8, generator=gen))  # fmt: skip


def forward(model: nn.Module, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(**inputs)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())

