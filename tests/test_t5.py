"""umT5 encoder against the reference fixtures (every case in t5/cases.json), padding independence, config
handling, checkpoint errors and the prompt -> embedding path. Must not hard-code the case list.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.t5 import (
    CONFIG_FILE,
    T5_FILE,
    TOKENIZER_SUBDIR,
    CheckpointError,
    T5Config,
    T5Encoder,
    TextEncoder,
    relative_buckets,
)
from pipeline.models.tokenizer import Umt5Tokenizer, write_tiny_tokenizer

T5_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "wan_ref" / "t5"


def _case_names() -> list[str]:
    path = T5_DIR / "cases.json"
    if not path.is_file():
        return ["<t5/cases.json missing>"]
    return [case["name"] for case in json.loads(path.read_text())["cases"]]


@pytest.fixture(scope="module")
def cases(wan_ref: Path) -> dict:
    return {c["name"]: c for c in json.loads((wan_ref / "t5" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def tensors(wan_ref: Path) -> dict[str, torch.Tensor]:
    return load_file(wan_ref / "t5" / "cases.safetensors")


@pytest.fixture(scope="module")
def encoder(wan_ref: Path) -> T5Encoder:
    return T5Encoder.from_checkpoint(wan_ref / "t5" / T5_FILE)


@pytest.mark.parametrize("name", _case_names())
def test_matches_reference_case(name: str, cases: dict, tensors: dict, encoder: T5Encoder) -> None:
    case = cases[name]
    ids, mask = tensors[case["inputs"]["ids"]["key"]], tensors[case["inputs"]["mask"]["key"]]
    out = encoder.encode(ids, mask)
    expected = [tensors[item["key"]] for item in case["expected"]["trimmed"]]
    assert [o.shape[0] for o in out] == [int(n) for n in mask.sum(1)]
    assert len(out) == len(expected)
    tol = case["tolerance"]
    for i, (actual, want) in enumerate(zip(out, expected, strict=True)):
        assert actual.shape == want.shape, f"{name}[{i}]: {list(actual.shape)} != {list(want.shape)}"
        rel = ((actual - want).norm() / want.norm()).item()
        worst = (actual - want).abs().max().item()
        assert rel <= tol["rel_l2"] and worst <= tol["max_abs"], f"{name}[{i}]: rel {rel:.2e} max {worst:.2e}"


def test_config_inferred_from_shapes_matches_fixture_config(wan_ref: Path, encoder: T5Encoder) -> None:
    fixture = json.loads((wan_ref / "t5" / "config.json").read_text())
    cfg = encoder.config
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn) == tuple(
        fixture[k] for k in ("vocab_size", "dim", "dim_attn", "dim_ffn")
    )
    assert (cfg.num_heads, cfg.encoder_layers, cfg.num_buckets, cfg.shared_pos) == tuple(
        fixture[k] for k in ("num_heads", "encoder_layers", "num_buckets", "shared_pos")
    )


def test_padding_length_does_not_change_valid_rows(encoder: T5Encoder) -> None:
    ids = torch.tensor([[17, 250, 3, 99, 1]])
    short = encoder.encode(ids, torch.ones_like(ids))[0]
    padded = torch.zeros(1, 40, dtype=torch.long)
    padded[0, :5] = ids
    mask = (torch.arange(40) < 5).long()[None]
    long = encoder.encode(padded, mask)[0]
    assert long.shape == (5, encoder.config.dim)
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)
    # Changing a padded id must not matter either; changing a real one must.
    padded[0, 20] = 7
    torch.testing.assert_close(encoder.encode(padded, mask)[0], long, rtol=0, atol=0)
    padded[0, 2] = 8
    assert not torch.allclose(encoder.encode(padded, mask)[0], long)


def test_bad_inputs_are_named(encoder: T5Encoder) -> None:
    with pytest.raises(ValueError, match=r"ids: values in \[1, 384\], expected within \[0, 384\)"):
        encoder.encode(torch.tensor([[384, 1]]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shapes"):
        encoder.encode(torch.tensor([[4, 1]]), torch.ones(1, 3, dtype=torch.long))


def test_config_that_disagrees_with_the_file_is_an_error(wan_ref: Path, tmp_path: Path) -> None:
    shutil.copy(wan_ref / "t5" / T5_FILE, tmp_path / T5_FILE)
    config = json.loads((wan_ref / "t5" / "config.json").read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(config, num_heads=8)))
    with pytest.raises(CheckpointError, match=r"t5_config.json: num_heads = 8, but .* has 4"):
        T5Encoder.from_checkpoint(tmp_path / T5_FILE)
    with pytest.raises(CheckpointError, match="field 'dim' = 'wide', expected int"):
        T5Encoder.from_checkpoint(tmp_path / T5_FILE, config=dict(config, dim="wide"))


def test_checkpoint_errors_name_file_and_key(wan_ref: Path, tmp_path: Path) -> None:
    state = torch.load(wan_ref / "t5" / T5_FILE, weights_only=True)
    broken = {k: v for k, v in state.items() if k != "blocks.1.ffn.gate.0.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken.pth: missing key 'blocks.1.ffn.gate.0.weight'"):
        T5Encoder.from_checkpoint(tmp_path / "broken.pth")
    torch.save(dict(state, **{"blocks.0.attn.o.weight": torch.zeros(32, 16)}), tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"key 'blocks.0.attn.o.weight' has shape \[32, 16\]"):
        T5Encoder.from_checkpoint(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable torch state dict"):
        T5Encoder.from_checkpoint(tmp_path / "junk.pth")


def test_text_encoder_from_checkpoint_dir(wan_ref: Path, tmp_path: Path, encoder: T5Encoder) -> None:
    """Released layout: the .pth, google/umt5-xxl/tokenizer.json and (tiny only) t5_config.json."""
    shutil.copy(wan_ref / "t5" / T5_FILE, tmp_path / T5_FILE)
    write_tiny_tokenizer(tmp_path / TOKENIZER_SUBDIR, encoder.config.vocab_size)
    config = json.loads((wan_ref / "t5" / "config.json").read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(config, text_len=16)))  # tiny DiT context length
    text = TextEncoder(tmp_path)
    prompts = ["A woman walks in the rain at night.", "", "cat " * 30]
    out = text(prompts)
    ids, mask = Umt5Tokenizer(tmp_path / TOKENIZER_SUBDIR, text_len=16)(prompts)
    assert [o.shape for o in out] == [(int(n), encoder.config.dim) for n in mask.sum(1)]
    assert out[1].shape[0] == 1 and out[2].shape[0] == 16  # empty prompt = EOS only; long one truncated
    for got, want in zip(out, encoder.encode(ids, mask), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_real_size_architecture_matches_the_release() -> None:
    """umT5-XXL: 242 tensors, 5,680,910,336 parameters, one position table per block."""
    with torch.device("meta"):
        model = T5Encoder(T5Config())
    state = model.state_dict()
    assert len(state) == 242
    assert sum(t.numel() for t in state.values()) == 5_680_910_336
    assert tuple(state["blocks.23.pos_embedding.embedding.weight"].shape) == (32, 64)
    assert tuple(state["blocks.0.ffn.gate.0.weight"].shape) == (10240, 4096)


def test_relative_buckets_follow_the_t5_rule() -> None:
    buckets = relative_buckets(1, 300, 32, torch.device("cpu"))[0]  # query 0, keys 0..299: rel = +k
    assert buckets[:8].tolist() == [0] + [16 + k for k in range(1, 8)]  # exact region, +16 for rel > 0
    assert buckets[8].item() == 16 + 8 and buckets[127].item() == 16 + 15 and buckets[299].item() == 31
    assert relative_buckets(300, 1, 32, torch.device("cpu"))[299, 0].item() == 15  # rel = -299


@pytest.mark.gpu
def test_cuda_matches_reference_cases(wan_ref: Path, cases: dict, tensors: dict) -> None:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = T5Encoder.from_checkpoint(wan_ref / "t5" / T5_FILE, device="cuda")
        bf16 = T5Encoder.from_checkpoint(wan_ref / "t5" / T5_FILE, dtype=torch.bfloat16, device="cuda")
        for name, case in cases.items():
            ids, mask = tensors[case["inputs"]["ids"]["key"]], tensors[case["inputs"]["mask"]["key"]]
            expected = [tensors[item["key"]] for item in case["expected"]["trimmed"]]
            for got, low, want in zip(fp32.encode(ids, mask), bf16.encode(ids, mask), expected, strict=True):
                got, low = got.cpu(), low.float().cpu()
                assert ((got - want).norm() / want.norm()).item() <= case["tolerance"]["rel_l2"], name
                assert ((low - want).norm() / want.norm()).item() < 5e-2, name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_bf16_option_is_close_to_float32(wan_ref: Path, encoder: T5Encoder) -> None:
    low = T5Encoder.from_checkpoint(wan_ref / "t5" / T5_FILE, dtype=torch.bfloat16)
    ids = torch.randint(2, 384, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    for ref, out in zip(encoder.encode(ids, mask), low.encode(ids, mask), strict=True):
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert 0 < ((out.float() - ref).norm() / ref.norm()).item() < 5e-2
