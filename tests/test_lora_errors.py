"""Bad LoRA files: each gives a LoraError (a ValueError) naming the file, the format it was read as and the
exact misfit, and nothing is applied.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.lora import LoraError, bind_lora, read_lora
from pipeline.lora.binding import kohya_names
from pipeline.weights.loader import load_animate_dit, load_dit
from tests.lora_writers import FIXTURE, make_lora, write_kohya, write_original

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return load_dit(FIXTURE / "dit_i2v" / "high_noise_model", torch.float32, "cpu")


def pair(down: tuple[int, ...], up: tuple[int, ...], module: str = "blocks.0.self_attn.q") -> dict[str, torch.Tensor]:
    return {f"diffusion_model.{module}.lora_down.weight": torch.zeros(down),
            f"diffusion_model.{module}.lora_up.weight": torch.zeros(up)}  # fmt: skip


def bind_error(tmp_path: Path, model: nn.Module, state: dict[str, torch.Tensor], name: str = "bad.safetensors") -> str:
    save_file(state, str(tmp_path / name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError) as caught:
        bind_lora(read_lora(tmp_path / name), model, 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


def test_unmapped_keys_are_listed_with_their_count(tmp_path: Path, model: nn.Module) -> None:
    state = pair((4, 64), (64, 4)) | pair((4, 64), (64, 4), "blocks.7.self_attn.q") | {
        "diffusion_model.blocks.0.self_attn.nope.diff_b": torch.zeros(64)}
    message = bind_error(tmp_path, model, state)
    assert message.startswith(f"{tmp_path / 'bad.safetensors'} (read as original LoRA): 3 keys map to no weight "
                              f"of WanDiT: ")  # fmt: skip
    assert "diffusion_model.blocks.7.self_attn.q.lora_down.weight (no parameter 'blocks.7.self_attn.q.weight')" in message
    assert "blocks.0.self_attn.nope.diff_b (no parameter 'blocks.0.self_attn.nope.bias')" in message
    assert message.endswith("; nothing was applied")
    many = {k: v for i in range(8) for k, v in pair((4, 64), (64, 4), f"blocks.{10 + i}.ffn.0").items()}
    assert "... (16 in all)" in bind_error(tmp_path, model, many)


def test_rank_and_partner_mismatches_name_the_keys(tmp_path: Path, model: nn.Module) -> None:
    message = bind_error(tmp_path, model, pair((4, 64), (64, 3)))
    assert ("diffusion_model.blocks.0.self_attn.q.lora_down.weight [4, 64] / diffusion_model.blocks.0.self_attn.q."
            "lora_up.weight [64, 3]: ranks 4 and 3 differ") in message  # fmt: skip
    lonely = {"diffusion_model.blocks.0.ffn.2.lora_up.weight": torch.zeros(64, 4)}
    assert "ffn.2.lora_up.weight: its lora_down partner is missing" in bind_error(tmp_path, model, lonely)
    alpha = {"diffusion_model.blocks.0.ffn.2.alpha": torch.tensor(4.0)}
    assert "an alpha without lora_down/lora_up" in bind_error(tmp_path, model, alpha)


def test_a_lora_for_another_model_size_gives_shape_errors(tmp_path: Path, model: nn.Module) -> None:
    """As a 1.3B/5B LoRA on the 14B model: dim 32 against the fixture's 64."""
    small = nn.Module()
    small.blocks = nn.ModuleList([nn.Module()])
    small.blocks[0].ffn = nn.Sequential(nn.Linear(32, 80), nn.GELU(), nn.Linear(80, 32))
    small.blocks[0].norm3 = nn.LayerNorm(32)
    lora = make_lora(small, ["blocks.0.ffn.0"], 4, seed=0, alpha=4.0, diffs=[("blocks.0.norm3.weight", "diff")])
    write_original(tmp_path / "small.safetensors", lora)
    with pytest.raises(LoraError) as caught:
        bind_lora(read_lora(tmp_path / "small.safetensors"), model, 1.0)
    message = str(caught.value)
    assert "2 tensors do not fit the model" in message
    assert ("lora_down.weight [4, 32] / diffusion_model.blocks.0.ffn.0.lora_up.weight [80, 4]: expected lora_down "
            "[4, 64] and lora_up [160, 4] for blocks.0.ffn.0.weight [160, 64]") in message  # fmt: skip
    assert "blocks.0.norm3.diff: shape [32], expected [64] for blocks.0.norm3.weight" in message


def test_a_wan21_i2v_lora_with_image_attention_does_not_fit_wan22_i2v_but_fits_animate(tmp_path: Path,
                                                                                        model: nn.Module) -> None:
    """Wan2.2's I2V expert has no k_img/v_img (WAN_SPEC §2.2); Animate has them, at the same width, so a LoRA
    made for Wan2.1 I2V binds there: keys and shapes cannot tell those apart."""
    state = pair((4, 64), (64, 4), "blocks.0.cross_attn.k_img") | pair((4, 64), (64, 4), "blocks.0.cross_attn.v_img")
    message = bind_error(tmp_path, model, state, "wan21_i2v.safetensors")
    assert "4 keys map to no weight of WanDiT" in message and "'blocks.0.cross_attn.k_img.weight'" in message
    assert "image cross-attention, which this model does not have" in message
    assert "ignore_absent_image_attention=True" in message
    # on request (lightx2v's Wan2.2 distillation LoRAs carry such keys) they are dropped, and listed
    save_file(state | pair((4, 160), (64, 4), "blocks.1.ffn.2") | {
        "diffusion_model.img_emb.proj.1.diff_b": torch.zeros(1280)}, str(tmp_path / "distill.safetensors"))
    bound = bind_lora(read_lora(tmp_path / "distill.safetensors"), model, 1.0, ignore_absent_image_attention=True)
    assert sorted(bound.touched) == ["blocks.1.ffn.2.weight"] and len(bound.ignored) == 5
    assert all("_img" in k or "img_emb" in k for k in bound.ignored)
    animate = load_animate_dit(FIXTURE / "dit_animate" / "model", torch.float32, "cpu")
    bound = bind_lora(read_lora(tmp_path / "wan21_i2v.safetensors"), animate, 1.0)
    assert sorted(bound.touched) == ["blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.v_img.weight"]


def test_truncated_empty_and_foreign_files(tmp_path: Path, model: nn.Module) -> None:
    good = write_original(tmp_path / "good.safetensors", make_lora(model, ["blocks.0.ffn.0"], 4, seed=0))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraError, match=r"cut.safetensors: unreadable safetensors file \(\d+ bytes\): .*truncated or corrupt"):
        read_lora(tmp_path / "cut.safetensors")
    torch.save({"blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64)}, tmp_path / "zip.pt")
    data = (tmp_path / "zip.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match=r"cut.pt: cannot read this zip torch file \(\d+ bytes\).*truncated"):
        read_lora(tmp_path / "cut.pt")
    torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "old.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-30])
    with pytest.raises(LoraError, match=r"cut.pth: cannot read this legacy \(non-zip\) torch file"):
        read_lora(tmp_path / "cut.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoraError, match=r"empty.safetensors: the file is empty \(0 bytes\)"):
        read_lora(tmp_path / "empty.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoraError, match=r"notes.txt: unknown file type '.txt'"):
        read_lora(tmp_path / "notes.txt")
    with pytest.raises(LoraError, match=r"absent.safetensors: LoRA file not found"):
        read_lora(tmp_path / "absent.safetensors")
    save_file({}, str(tmp_path / "none.safetensors"))
    with pytest.raises(LoraError, match="holds no tensors"):
        read_lora(tmp_path / "none.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(LoraError, match=r"list.pt: expected a dict of named tensors .* found list"):
        read_lora(tmp_path / "list.pt")


def test_unsupported_kinds_integer_tensors_and_bad_strength(tmp_path: Path, model: nn.Module) -> None:
    save_file({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(1.0)}, str(tmp_path / "loha.safetensors"))  # fmt: skip
    with pytest.raises(LoraError, match=r"loha.safetensors \(read as kohya LoRA\): 1 keys are of no LoRA kind "
                                        r"applied here .*: lora_unet_blocks_0_ffn_0.hada_w1_a"):  # fmt: skip
        read_lora(tmp_path / "loha.safetensors")
    save_file({"blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32),
               "blocks.0.ffn.0.lora_B.weight": torch.zeros(160, 4)}, str(tmp_path / "int.safetensors"))  # fmt: skip
    with pytest.raises(LoraError, match=r"must be floating point; blocks.0.ffn.0.lora_A.weight are torch.int32"):
        read_lora(tmp_path / "int.safetensors")
    good = read_lora(write_original(tmp_path / "g.safetensors", make_lora(model, ["blocks.0.ffn.0"], 4, seed=0)))
    for strength in (float("nan"), float("inf"), "1", True):
        with pytest.raises(LoraError, match=r"g.safetensors \(read as original LoRA\): strength .*finite number"):
            bind_lora(good, model, strength)  # type: ignore[arg-type]


def test_kohya_names_resolve_unambiguously_or_not_at_all(tmp_path: Path, model: nn.Module) -> None:
    unique, shared = kohya_names(name for name, _ in model.named_parameters())
    assert unique["blocks_0_self_attn_q"] == "blocks.0.self_attn.q" and unique["blocks_1_modulation"] == "blocks.1.modulation"
    assert not shared  # the Wan module tree has no two names that read alike with underscores
    toy = nn.Module()
    toy.a_b, toy.a = nn.Module(), nn.Module()
    toy.a_b.c, toy.a.b_c = nn.Linear(2, 2), nn.Linear(2, 2)
    lora = make_lora(toy, ["a_b.c"], 1, seed=0)
    write_kohya(tmp_path / "k.safetensors", lora)
    with pytest.raises(LoraError, match=r"lora_unet_a_b_c.lora_down.weight \(ambiguous: a.b_c or a_b.c\)"):
        bind_lora(read_lora(tmp_path / "k.safetensors"), toy, 1.0)
    save_file({"lora_unet_blocks_0_self_attn_x.lora_down.weight": torch.zeros(1, 64),
               "lora_unet_blocks_0_self_attn_x.lora_up.weight": torch.zeros(64, 1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraError, match=r"\(no module 'blocks_0_self_attn_x'\)"):
        bind_lora(read_lora(tmp_path / "x.safetensors"), model, 1.0)
