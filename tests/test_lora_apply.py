"""Applying LoRAs to resident models: several at once, per expert, the pristine store across jobs, failures
that undo themselves, the hook reach check, the method rule, the sidecar description; one CUDA bf16 test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.lora import (
    LoraError,
    LoraRequest,
    Method,
    PristineWeights,
    SwitchCosts,
    apply_loras,
    bind_lora,
    bind_requests,
    choose_method,
    hook_loras,
    merge_loras,
    read_lora,
    touched_bytes,
)
from pipeline.lora import hooks as hooks_mod
from pipeline.lora.binding import LowRank
from pipeline.models.fast import optimize
from pipeline.weights.loader import load_dit
from tests.lora_writers import (
    BLOCK_LINEARS,
    FIXTURE,
    expected,
    forward,
    forward_inputs,
    make_lora,
    rel,
    write_kohya,
    write_original,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread

EXPERTS = {"high_noise": FIXTURE / "dit_i2v" / "high_noise_model", "low_noise": FIXTURE / "dit_i2v" / "low_noise_model"}


def load(name: str = "high_noise", fused: bool = True, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = load_dit(EXPERTS[name], dtype, device)
    return optimize(model, compile=False, fuse_qkv=fused)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory: pytest.TempPathFactory):
    """A distillation-like LoRA (every block Linear, diffs) and a style LoRA on a few layers, both as files."""
    folder = tmp_path_factory.mktemp("loras")
    model = load()
    every = [f"blocks.{i}.{m}" for i in (0, 1) for m in BLOCK_LINEARS]
    distill = make_lora(model, every, 4, seed=1, alpha=4.0,
                        diffs=[("blocks.0.norm3.bias", "diff_b"), ("head.modulation", "diff_m")])  # fmt: skip
    style = make_lora(model, ["blocks.0.self_attn.q", "blocks.1.ffn.0", "head.head"], 2, seed=2, alpha=1.0)
    return (distill, read_lora(write_original(folder / "distill.safetensors", distill)),
            style, read_lora(write_kohya(folder / "style.safetensors", style)))  # fmt: skip


def test_two_loras_at_different_strengths_add_up_and_come_off_exactly(two_loras) -> None:
    distill, distill_file, style, style_file = two_loras
    model, reference = load(), load()
    inputs = forward_inputs(model)
    bound = [bind_lora(distill_file, model, 1.0), bind_lora(style_file, model, -0.5)]
    want = expected(model, [(distill, 1.0), (style, -0.5)])
    with merge_loras(model, bound):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p, want[name], rtol=0, atol=3e-6)
        merged = forward(model, inputs)
    assert same_weights(model, reference)
    with hook_loras(model, bound):
        hooked = forward(model, inputs)
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    one = bind_lora(distill_file, model, 1.0)
    with merge_loras(model, [one]):
        assert rel(forward(model, inputs), merged) > 1e-3  # the style LoRA's share is visible
    assert same_weights(model, reference) and torch.equal(forward(model, inputs), forward(reference, inputs))


def test_per_expert_targeting_mixed_methods_and_the_sidecar(two_loras) -> None:
    _, distill_file, _, style_file = two_loras
    models, fresh = {n: load(n) for n in EXPERTS}, {n: load(n) for n in EXPERTS}
    inputs = forward_inputs(models["high_noise"])
    job = bind_requests([LoraRequest(distill_file, 1.0, ("high_noise",)), LoraRequest(style_file, 0.8)], models)
    assert [len(job.on(n)) for n in EXPERTS] == [2, 1]
    methods = {"high_noise": Method.MERGED, "low_noise": Method.UNMERGED}
    with apply_loras(job, models, methods) as applied:
        out = {n: forward(m, inputs) for n, m in models.items()}
        assert not same_weights(models["high_noise"], fresh["high_noise"])
        assert not same_weights(models["low_noise"], fresh["low_noise"])  # head.head is merged even when hooked
        low_alone = merge_loras(fresh["low_noise"], [bind_lora(style_file, fresh["low_noise"], 0.8)])
        torch.testing.assert_close(out["low_noise"], forward(fresh["low_noise"], inputs), rtol=1e-4, atol=1e-5)
        low_alone.restore()
        sidecar = applied.describe()
    assert sidecar == [
        {"file": "distill.safetensors", "sha256": distill_file.sha256, "strength": 1.0, "format": "original",
         "experts": ["high_noise"], "method": {"high_noise": "merged"}, "weights": {"high_noise": 22}},
        {"file": "style.safetensors", "sha256": style_file.sha256, "strength": 0.8, "format": "kohya",
         "experts": ["high_noise", "low_noise"], "method": {"high_noise": "merged", "low_noise": "unmerged"},
         "weights": {"high_noise": 3, "low_noise": 3}},
    ]  # fmt: skip  (22 = 2 blocks x 10 Linears + 2 diffs)
    for name in EXPERTS:
        assert same_weights(models[name], fresh[name])
        assert torch.equal(forward(models[name], inputs), forward(fresh[name], inputs))
    with pytest.raises(LoraError, match=r"style.safetensors \(read as kohya LoRA\): expert 'mid_noise': this model "
                                        r"family has 'high_noise', 'low_noise'"):  # fmt: skip
        bind_requests([LoraRequest(style_file, 1.0, ("mid_noise",))], models)


def test_pristine_copies_serve_later_jobs_and_a_double_merge_is_refused(two_loras) -> None:
    _, distill_file, _, style_file = two_loras
    model, reference = load(), load()
    store = PristineWeights("cpu")
    first = merge_loras(model, [bind_lora(distill_file, model, 1.0)], store)
    kept = store.nbytes
    assert kept == touched_bytes([bind_lora(distill_file, model, 1.0)]) > 0
    with pytest.raises(RuntimeError, match="already merged and not restored"):
        merge_loras(model, [bind_lora(distill_file, model, 1.0)], store)
    with pytest.raises(RuntimeError, match="still merged"):
        store.release()
    first.restore()
    first.restore()  # idempotent
    assert same_weights(model, reference)
    second = merge_loras(model, [bind_lora(distill_file, model, 0.5), bind_lora(style_file, model, 1.0)], store)
    assert store.nbytes > kept  # only the style LoRA's new weights were copied
    second.restore()
    assert same_weights(model, reference)
    store.release()
    assert store.nbytes == 0


def test_a_failing_merge_restores_what_it_had_changed(two_loras, monkeypatch: pytest.MonkeyPatch) -> None:
    _, distill_file, _, _ = two_loras
    model, reference = load(), load()
    bound = bind_lora(distill_file, model, 1.0)
    calls = {"n": 0}
    real = LowRank.delta

    def failing(self: LowRank, device: torch.device) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("simulated out of memory")
        return real(self, device)

    monkeypatch.setattr(LowRank, "delta", failing)
    with pytest.raises(MemoryError):
        merge_loras(model, [bound])
    assert calls["n"] == 5 and same_weights(model, reference)


def test_a_hook_that_never_runs_fails_loudly(two_loras, monkeypatch: pytest.MonkeyPatch) -> None:
    """head.head is called functionally (fp32 island); pretending it were hookable must not pass silently."""
    _, _, _, style_file = two_loras
    model, reference = load(), load()
    monkeypatch.setattr(hooks_mod, "FUNCTIONAL_LINEARS", frozenset())
    with hook_loras(model, [bind_lora(style_file, model, 1.0)]), \
            pytest.raises(RuntimeError, match=r"hooks on head\.head never ran"):  # fmt: skip
        forward(model, forward_inputs(model))
    assert same_weights(model, reference)
    assert all(not m._forward_hooks for m in model.modules())  # the reach check removed itself too


def test_choose_method_follows_memory_and_cost(two_loras) -> None:
    _, distill_file, _, style_file = two_loras
    model = load()
    distill, style = [bind_lora(distill_file, model, 1.0)], [bind_lora(style_file, model, 1.0)]
    size = touched_bytes(distill)
    costs = SwitchCosts(merge_restore_s_per_gib=0.05, hook_s_per_layer_ktoken=1e-5, eager_s_per_ktoken=0.02)
    # the real-size arithmetic: 28.6 GB merged vs 4 compiled 720p forwards -> merge
    big = dict(forwards=4, tokens=75_600, compiled=True, costs=costs)
    assert choose_method(distill, pristine_room_bytes=size, **big) is Method.MERGED
    assert choose_method(distill, pristine_room_bytes=size - 1, **big) is Method.UNMERGED  # no room to undo
    cheap = SwitchCosts(merge_restore_s_per_gib=1e6, hook_s_per_layer_ktoken=1e-5, eager_s_per_ktoken=0.02)
    assert choose_method(style, forwards=4, tokens=100, pristine_room_bytes=size, compiled=False,
                         costs=cheap) is Method.UNMERGED  # fmt: skip
    assert choose_method([], forwards=1, tokens=1, pristine_room_bytes=0, compiled=False) is Method.MERGED


@pytest.mark.gpu
def test_cuda_bf16_merge_and_restore_are_bitwise(two_loras, tmp_path: Path) -> None:
    _, distill_file, _, style_file = two_loras
    model, reference = (load(device="cuda", dtype=torch.bfloat16) for _ in range(2))
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in forward_inputs(model).items()}
    plain = forward(model, inputs)
    for store in (PristineWeights("cpu", pin_memory=True), PristineWeights("cuda"), None):
        bound = [bind_lora(distill_file, model, 1.0), bind_lora(style_file, model, 0.5)]
        with merge_loras(model, bound, store):
            merged = forward(model, inputs)
        assert same_weights(model, reference) and torch.equal(forward(model, inputs), plain)
        with hook_loras(model, bound):
            hooked = forward(model, inputs)
        assert same_weights(model, reference) and torch.equal(forward(model, inputs), plain)
        assert rel(merged.float(), plain.float()) > 1e-2 and rel(hooked.float(), merged.float()) < 2e-2


@pytest.mark.slow  # ~13 s on the CPU: compiling the blocks
def test_compiled_blocks_see_merged_weights_and_run_hooks_eagerly(two_loras) -> None:
    """The pool compiles the blocks: a merge must reach the compiled graphs (weights are graph inputs, not
    constants), hooks run eagerly, and afterwards the compiled model gives its old output bit for bit."""
    _, distill_file, _, style_file = two_loras
    model, eager = load(), load()
    optimize(model, compile=True, fuse_qkv=True)
    inputs = forward_inputs(model)
    plain = forward(model, inputs)
    bound = [bind_lora(distill_file, model, 1.0), bind_lora(style_file, model, 0.5)]
    with merge_loras(model, bound), merge_loras(eager, bound):
        merged, merged_eager = forward(model, inputs), forward(eager, inputs)
    torch.testing.assert_close(merged, merged_eager, rtol=1e-4, atol=1e-5)
    assert rel(merged, plain) > 1e-2
    assert torch.equal(forward(model, inputs), plain)
    with hook_loras(model, bound):
        torch.testing.assert_close(forward(model, inputs), merged_eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(forward(model, inputs), plain)
