"""Every published LoRA layout, written for the tiny I2V fixture expert, read, bound, merged and hooked.

Per layout and with the fused q/k/v fast path off and on: the merged weights equal W + strength * (alpha /
rank) * B @ A (+ strength * diff) computed by hand, the unmerged hooks give the merged forward within fp32
rounding, and afterwards every parameter and a forward are bit-identical to a freshly loaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.lora import LoraFormat, bind_lora, hook_loras, merge_loras, read_lora
from pipeline.models.fast import fused_blocks, optimize
from pipeline.weights.loader import load_dit
from tests.lora_writers import (
    BLOCK_LINEARS,
    FIXTURE,
    TinyLora,
    expected,
    forward,
    forward_inputs,
    make_lora,
    rel,
    write_diffusers,
    write_kohya,
    write_original,
    write_peft_ckpt,
    write_peft_dir,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread

EXPERT = FIXTURE / "dit_i2v" / "high_noise_model"
RANK, ALPHA, STRENGTH = 4, 2.0, 0.7
# every block Linear of block 0, some of block 1, a hookable top-level Linear, the fp32-island Linears the DiT
# calls functionally (merged even in hook mode) and the patch-embedding conv (kohya-style conv LoRA)
MODULES = [f"blocks.0.{m}" for m in BLOCK_LINEARS] + [
    "blocks.1.self_attn.q", "blocks.1.self_attn.v", "blocks.1.ffn.2", "text_embedding.0", "time_projection.1",
    "head.head", "patch_embedding"]  # fmt: skip
DIFFS = [("blocks.0.norm3.weight", "diff"), ("blocks.0.self_attn.q.bias", "diff_b"),
         ("blocks.1.cross_attn.o.bias", "diff_b"), ("blocks.1.modulation", "diff"), ("head.modulation", "diff_m"),
         ("blocks.0.modulation", "diff_m"), ("head.head.bias", "diff_b")]  # fmt: skip
# diffusers stores bias diffs as PEFT's lora_B.bias, which exists only beside a pair (a lone one is an error)
DIFFUSERS_DIFFS = [d for d in DIFFS if d[0] != "blocks.1.cross_attn.o.bias"]

Writer = Callable[[Path, TinyLora], Path]
LAYOUTS: dict[str, tuple[Writer, LoraFormat, float | None, list]] = {
    # name: (writer, format it must be read as, alpha, diffs the layout carries)
    "original-safetensors": (lambda d, lora: write_original(d / "l.safetensors", lora), LoraFormat.ORIGINAL,
                             ALPHA, DIFFS),
    "original-bare-lora_A-pt": (lambda d, lora: write_original(d / "l.pt", lora, prefix="", ab=True),
                                LoraFormat.ORIGINAL, ALPHA, DIFFS),
    "original-legacy-pth": (lambda d, lora: write_original(d / "l.pth", lora), LoraFormat.ORIGINAL, None, DIFFS),
    "kohya": (lambda d, lora: write_kohya(d / "l.safetensors", lora), LoraFormat.KOHYA, ALPHA, DIFFS),
    "diffusers": (lambda d, lora: write_diffusers(d / "l.safetensors", lora, ALPHA, RANK), LoraFormat.DIFFUSERS,
                  ALPHA, DIFFUSERS_DIFFS),
    "peft-ckpt": (lambda d, lora: write_peft_ckpt(d / "relighting_lora.ckpt", lora), LoraFormat.PEFT, None, []),
    "peft-dir": (lambda d, lora: write_peft_dir(d / "adapter", lora, ALPHA), LoraFormat.PEFT, ALPHA, []),
}  # fmt: skip


def fresh(fused: bool) -> torch.nn.Module:
    model = load_dit(EXPERT, torch.float32, "cpu")
    return optimize(model, compile=False, fuse_qkv=fused) if fused else model


def assert_pristine(model: torch.nn.Module, reference: torch.nn.Module, inputs: dict) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs after restore"
    assert torch.equal(forward(model, inputs), forward(reference, inputs))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-qkv"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_merges_as_by_hand_hooks_agree_and_restore_is_bitwise(layout: str, fused: bool, tmp_path: Path) -> None:
    writer, fmt, alpha, diffs = LAYOUTS[layout]
    model, reference = fresh(fused), fresh(fused)
    inputs = forward_inputs(model)
    plain = forward(model, inputs)
    lora = make_lora(model, MODULES, RANK, seed=11, alpha=alpha, diffs=diffs)
    file = read_lora(writer(tmp_path, lora))
    assert file.format is fmt and len(file.sha256) == 64
    bound = bind_lora(file, model, STRENGTH)
    want = expected(model, [(lora, STRENGTH)])
    assert set(bound.touched) == {f"{m}.weight" for m in MODULES} | {p for p, _ in diffs}

    merged = merge_loras(model, [bound])
    if fused:
        assert fused_blocks(model) == 2  # merged in place: the fused q/k/v buffer carries the change
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    out_merged = forward(model, inputs)
    merged.restore()
    assert_pristine(model, reference, inputs)
    assert rel(out_merged, plain) > 1e-2  # the LoRA really changes the output

    with hook_loras(model, [bound]) as hooks:
        out_hooked = forward(model, inputs)
        assert "blocks.0.self_attn.q" in hooks.hooked and "head.head" not in hooks.hooked
        assert {"head.head.weight", "time_projection.1.weight", "patch_embedding.weight"} <= set(hooks.merged_params)
    torch.testing.assert_close(out_hooked, out_merged, rtol=1e-4, atol=1e-5)
    assert all("qkv_delta" not in b.self_attn.__dict__ for b in model.blocks)  # nothing left on the modules
    assert_pristine(model, reference, inputs)


def test_bias_diffs_on_fused_qkv_reach_the_fused_buffer(tmp_path: Path) -> None:
    """A `.diff_b` on q's bias changes the fused [3*dim] bias the fast path reads, and only its q rows."""
    model = fresh(True)
    lora = make_lora(model, [], RANK, seed=3, diffs=[("blocks.0.self_attn.q.bias", "diff_b")])
    bound = bind_lora(read_lora(write_original(tmp_path / "b.safetensors", lora)), model, 1.0)
    before = model.blocks[0].self_attn.qkv_bias.clone()
    with merge_loras(model, [bound]):
        after = model.blocks[0].self_attn.qkv_bias
        torch.testing.assert_close(after[:64], before[:64] + lora.diffs[0].tensor, rtol=0, atol=1e-7)
        assert torch.equal(after[64:], before[64:])
    assert torch.equal(model.blocks[0].self_attn.qkv_bias, before)
