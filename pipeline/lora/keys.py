"""The key grammar of published Wan LoRA files: which format a file is in, and what each key holds for which
module, renamed to our (the reference's) module names (WAN_SPEC §2.2).

Must not look at tensors or at a model: kohya's underscored paths stay unresolved here (binding.py resolves
them against the model's module tree).

Formats (key patterns as the public converters read them: ComfyUI comfy/lora.py, diffusers'
lora_conversion_utils Wan converters, LightX2V's lora_loader, musubi-tuner's saved files):
* original: `[diffusion_model.]blocks.0.self_attn.q.lora_down.weight` / `lora_up.weight` or `lora_A` /
  `lora_B`, optional `<module>.alpha`, full tensors `<module>.diff` (added to the weight, or to the parameter
  itself, e.g. `blocks.0.modulation.diff`), `<module>.diff_b` (bias) and `<module>.diff_m` (modulation).
* kohya: `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha` (musubi-tuner, sd-scripts).
* diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight`, diffusers' own module names (attn1/attn2,
  to_out.0, ffn.net.0.proj, norm2 = our norm3, condition_embedder.*, proj_out, scale_shift_table, add_k_proj).
* peft: `base_model.model.<module>.lora_A.weight` or `<module>.lora_A.<adapter>.weight` (Animate's
  relighting_lora.ckpt), module names ours or diffusers'; `lora_B.bias` is PEFT's lora_bias.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class LoraFormat(str, Enum):
    ORIGINAL = "original"
    KOHYA = "kohya"
    DIFFUSERS = "diffusers"
    PEFT = "peft"


class Part(str, Enum):
    """What one key holds."""

    DOWN = "lora_down"  # A [rank, in...]
    UP = "lora_up"  # B [out, rank...]
    ALPHA = "alpha"  # scalar: scale = alpha / rank
    DIFF = "diff"  # full tensor added to `<module>.weight` (or to the parameter `<module>` itself)
    DIFF_B = "diff_b"  # full tensor added to `<module>.bias`
    DIFF_M = "diff_m"  # full tensor added to `<module>.modulation` (lightx2v's Wan2.1 distillation LoRAs)
    UP_BIAS = "lora_B.bias"  # PEFT lora_bias: added to `<module>.bias`, scaled like the pair


@dataclass(frozen=True)
class KeyRef:
    """One key of the file: what it holds for which module (our dotted name, or kohya's underscored one)."""

    key: str
    module: str
    part: Part
    file_module: str  # the module as the file names it, prefixes removed (PEFT alpha patterns match it)
    underscored: bool = False


@dataclass(frozen=True)
class ParsedKeys:
    format: LoraFormat
    refs: tuple[KeyRef, ...]
    unknown: tuple[str, ...]  # no LoRA key of a kind we apply (lora_mid, dora_scale, hada_*, lokr_*, ...)


KOHYA_PREFIX = "lora_unet_"
PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.")  # stripped in this order
_SUFFIXES = (
    (re.compile(r"\.lora_(?:down|A)(?:\.([\w-]+))?\.weight$"), Part.DOWN),
    (re.compile(r"\.lora_(?:up|B)(?:\.([\w-]+))?\.weight$"), Part.UP),
    (re.compile(r"\.lora_B(?:\.([\w-]+))?\.bias$"), Part.UP_BIAS),
    (re.compile(r"\.alpha$"), Part.ALPHA),
    (re.compile(r"\.diff$"), Part.DIFF),
    (re.compile(r"\.diff_b$"), Part.DIFF_B),
    (re.compile(r"\.diff_m$"), Part.DIFF_M),
)
_DIFFUSERS_NAMES = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|scale_shift_table)(\.|$)|ffn\.net\.")

# diffusers' module names -> ours (diffusers scripts/convert_wan_to_diffusers.py, read backwards)
_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
)
_DIFFUSERS_BLOCK = (
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"), ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("norm2", "norm3"), ("norm3", "norm2"),  # diffusers numbers the norms in call order; the reference does not
    ("scale_shift_table", "modulation"),
)  # fmt: skip
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FACE_BLOCK = re.compile(r"^face_adapter\.(\d+)\.(.+)$")


def parse_keys(keys: Iterable[str]) -> ParsedKeys:
    """Every key -> KeyRef (or `unknown`), and the file's format told from the keys as a whole."""
    items, unknown = [], []
    for key in keys:
        found = _split(key)
        if found is None:
            unknown.append(key)
        else:
            module, part = found
            items.append((key, module, part, _strip(module)))
    # diffusers' names are a property of the file: its `norm2` is our norm3, which no single key can tell
    diffusers_names = any(
        module.startswith("transformer.") or (not module.startswith(KOHYA_PREFIX) and _DIFFUSERS_NAMES.search(bare))
        for _, module, _, bare in items
    )
    refs = []
    for key, module, part, bare in items:
        if module.startswith(KOHYA_PREFIX):
            name = module[len(KOHYA_PREFIX):]
            refs.append(KeyRef(key, name, part, name, underscored=True))
        else:
            refs.append(KeyRef(key, from_diffusers(bare) if diffusers_names else bare, part, bare))
    return ParsedKeys(_format(items, diffusers_names), tuple(refs), tuple(unknown))


def from_diffusers(path: str) -> str:
    """A diffusers Wan module path in our names (unknown paths unchanged: the binding then reports them)."""
    for theirs, ours in _DIFFUSERS_TOP:
        if path == theirs or path.startswith(theirs + "."):
            return ours + path[len(theirs):]
    for pattern, prefix in ((_BLOCK, "blocks"), (_FACE_BLOCK, "face_adapter.fuser_blocks")):
        m = pattern.match(path)
        if m is None:
            continue
        rest = m.group(2)
        for theirs, ours in _DIFFUSERS_BLOCK if prefix == "blocks" else ():
            if rest == theirs or rest.startswith(theirs + "."):
                rest = ours + rest[len(theirs):]
                break
        return f"{prefix}.{m.group(1)}.{rest}"
    return path


def _split(key: str) -> tuple[str, Part] | None:
    for pattern, part in _SUFFIXES:
        m = pattern.search(key)
        if m is not None and m.start() > 0:
            return key[: m.start()], part
    return None


def _strip(module: str) -> str:
    for prefix in PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module


def _format(items: list[tuple[str, str, Part, str]], diffusers_names: bool) -> LoraFormat:
    """kohya if its prefix is used; peft for PEFT's prefix or adapter-named keys; then diffusers' names."""
    if any(m.startswith(KOHYA_PREFIX) for _, m, _, _ in items):
        return LoraFormat.KOHYA
    if any(m.startswith("base_model.model.") or _adapter_named(k) for k, m, _, _ in items):
        return LoraFormat.PEFT
    return LoraFormat.DIFFUSERS if diffusers_names else LoraFormat.ORIGINAL


def _adapter_named(key: str) -> bool:
    return re.search(r"\.lora_[AB]\.[\w-]+\.(weight|bias)$", key) is not None
