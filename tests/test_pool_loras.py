"""The pool's per-job LoRAs (pipeline.families.loras) on the tiny fixture experts, with jobs made by the real
manifest parser: bound before any work, the method per expert, exact removal, the sha256 read cache, the library
checked again before use, image-attention keys dropped and described, and every LoRA problem as an input error.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pipeline.families.loras as pool_loras
from inbox_schema import parse_manifest_text
from pipeline.families.base import JobInputError
from pipeline.families.loras import PoolLoras
from pipeline.lora import Method, read_lora
from pipeline.weights.loader import load_dit
from tests.lora_writers import BLOCK_LINEARS, FIXTURE, expected, make_lora, write_kohya, write_original

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread

EXPERTS = {"high_noise": FIXTURE / "dit_i2v" / "high_noise_model", "low_noise": FIXTURE / "dit_i2v" / "low_noise_model"}
EVERY = [f"blocks.{i}.{m}" for i in (0, 1) for m in BLOCK_LINEARS]


def experts() -> dict[str, torch.nn.Module]:
    return {name: load_dit(path, torch.float32, "cpu") for name, path in EXPERTS.items()}


def job_text(*loras: str) -> str:
    return ('schema = 1\nkind = "i2v"\nprompt = "p"\n[inputs]\nimage = "cat.jpg"\n[sampling]\nseed = 1\n'
            + "".join(f"[[lora]]\n{entry}\n" for entry in loras))


def parse(text: str, inbox: Path, library: Path):
    return parse_manifest_text(text, "job.toml", inbox, inbox, check_inputs=False, lora_library=library)


@pytest.fixture()
def setup(tmp_path: Path):
    """A library with a distillation-like LoRA (every block Linear, diffs, and the k_img/v_img keys lightx2v's
    Wan2.2 LoRAs carry) and an inbox with a kohya style LoRA, written for the tiny experts."""
    models = experts()
    library, inbox = tmp_path / "models" / "loras", tmp_path / "inbox"
    library.mkdir(parents=True)
    inbox.mkdir()
    distill = make_lora(models["high_noise"], EVERY, 4, seed=1, alpha=4.0,
                        diffs=[("blocks.0.norm3.bias", "diff_b"), ("head.modulation", "diff_m")])
    path = write_original(library / "distill.safetensors", distill)
    _add_image_attention_keys(path)
    style = make_lora(models["low_noise"], ["blocks.0.self_attn.q", "blocks.1.ffn.0"], 2, seed=2, alpha=1.0)
    write_kohya(inbox / "style.safetensors", style)
    return models, library, inbox, distill, style


def _add_image_attention_keys(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    for block in (0, 1):
        for module in ("k_img", "v_img"):
            state[f"diffusion_model.blocks.{block}.cross_attn.{module}.lora_down.weight"] = torch.ones(4, 64)
            state[f"diffusion_model.blocks.{block}.cross_attn.{module}.lora_up.weight"] = torch.ones(64, 4)
        state[f"diffusion_model.blocks.{block}.cross_attn.norm_k_img.diff"] = torch.ones(64)
    save_file(state, str(path))


def test_a_job_goes_on_and_comes_off_exactly_with_the_description(setup) -> None:
    models, library, inbox, distill, style = setup
    reference = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    job = parse(job_text('library = "distill.safetensors"\nexpert = "high_noise"',
                         'path = "style.safetensors"\nstrength = -0.5\nexpert = "low_noise"'), inbox, library)
    pool = PoolLoras(models, torch.device("cpu"), compiled=False, method="merged")
    want = expected(models["high_noise"], [(distill, 1.0)])
    run = pool.bind(job)
    pool.apply(run, {"high_noise": 2, "low_noise": 2}, tokens=36)
    for name, p in models["high_noise"].named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=3e-6, msg=lambda m, n=name: f"{n}: {m}")
    run.remove()
    for name, model in models.items():
        assert all(torch.equal(v, reference[name][k]) for k, v in model.state_dict().items()), name
    distill_item, style_item = run.describe()
    assert (distill_item["file"], distill_item["format"], distill_item["experts"], distill_item["method"]) == (
        "distill.safetensors", "original", ["high_noise"], {"high_noise": "merged"})
    assert distill_item["sha256"] == read_lora(library / "distill.safetensors").sha256
    assert distill_item["ignored_keys"]["count"] == {"high_noise": 10}  # 2 blocks x (2 pairs + alpha-less diff)
    assert "diffusion_model.blocks.*.cross_attn.k_img.lora_down.weight" in distill_item["ignored_keys"]["keys"]
    assert (style_item["format"], style_item["strength"], style_item["experts"]) == ("kohya", -0.5, ["low_noise"])
    assert run.switch_seconds()["apply"] > 0 and run.switch_seconds()["remove"] > 0


def test_the_method_follows_the_rule_or_the_pool_flag(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    models, library, inbox, *_ = setup
    job = parse(job_text('library = "distill.safetensors"'), inbox, library)
    seen = []
    real = pool_loras.choose_method
    monkeypatch.setattr(pool_loras, "choose_method", lambda loras, **kw: seen.append(kw) or real(loras, **kw))
    auto = PoolLoras(models, torch.device("cpu"), compiled=True)
    run = auto.bind(job)
    auto.apply(run, {"high_noise": 3, "low_noise": 5}, tokens=36)
    rule = [real(run.bound.on(n), forwards=f, tokens=36, pristine_room_bytes=1 << 40, compiled=True)
            for n, f in (("high_noise", 3), ("low_noise", 5))]
    assert run.applied.methods == {"high_noise": rule[0], "low_noise": rule[1]}
    assert [(kw["forwards"], kw["tokens"], kw["compiled"]) for kw in seen] == [(3, 36, True), (5, 36, True)]
    assert all(kw["pristine_room_bytes"] > 0 for kw in seen)
    run.remove()
    for method in (Method.UNMERGED, Method.MERGED):
        forced = PoolLoras(models, torch.device("cpu"), compiled=False, method=method.value)
        run = forced.bind(job)
        forced.apply(run, {}, tokens=36)
        assert set(run.applied.methods.values()) == {method}
        run.remove()
    sharded = PoolLoras(models, torch.device("cpu"), compiled=False, sharded=True)
    assert sharded._method("high_noise", run.bound, 4, 36) is Method.UNMERGED


def test_files_are_read_once_per_sha256_and_the_cache_is_bounded(setup, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    models, library, inbox, *_ = setup
    reads = []
    monkeypatch.setattr(pool_loras, "read_lora", lambda path: reads.append(Path(path).name) or read_lora(path))
    pool = PoolLoras(models, torch.device("cpu"), compiled=False)
    sha = read_lora(library / "distill.safetensors").sha256
    job = parse(job_text(f'library = "distill.safetensors"\nsha256 = "{sha}"'), inbox, library)
    for _ in range(3):
        run = pool.bind(job)
        pool.apply(run, {"high_noise": 1, "low_noise": 1}, 36)
        run.remove()
    assert reads == ["distill.safetensors"]  # later jobs took it from the cache, by content
    tiny = PoolLoras(models, torch.device("cpu"), compiled=False, cache_bytes=1)
    other = parse(job_text('path = "style.safetensors"'), inbox, library)
    for each in (job, other, job):
        tiny.bind(each)
    assert reads[1:] == ["distill.safetensors", "style.safetensors", "distill.safetensors"]  # one file kept
    assert len(tiny._files) == 1


def test_every_lora_problem_is_an_input_error_before_anything_is_applied(setup, tmp_path: Path) -> None:
    models, library, inbox, *_ = setup
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    pool = PoolLoras(models, torch.device("cpu"), compiled=False)

    def fails(job, *needles: str) -> str:
        with pytest.raises(JobInputError) as caught:
            pool.bind(job)
        for needle in needles:
            assert needle in str(caught.value), str(caught.value)
        return str(caught.value)

    # the library file was swapped for a symbolic link leading out of the library after acceptance
    job = parse(job_text('library = "distill.safetensors"'), inbox, library)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(library / "distill.safetensors", outside)
    os.symlink(outside, library / "distill.safetensors")
    fails(job, "lora[0].library", "outside it (symbolic link)")
    # the file changed after acceptance (the job recorded another sha256)
    (library / "distill.safetensors").unlink()
    os.replace(outside, library / "distill.safetensors")
    fails(replace(job, loras=(replace(job.loras[0], sha256="0" * 64),)), "lora[0]", "sha256", "expected 000")
    # unmapped keys, a truncated file, another model size
    bad = make_lora(models["high_noise"], ["blocks.0.self_attn.q"], 2, seed=5)
    path = write_original(inbox / "bad.safetensors", bad)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.ones(2, 64)
    state["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.ones(64, 2)
    save_file(state, str(path))
    fails(parse(job_text('path = "bad.safetensors"'), inbox, library), "lora[0]: ", "bad.safetensors",
          "(read as original LoRA)", "map to no weight", "blocks.7.self_attn.q")
    path.write_bytes(path.read_bytes()[:200])
    fails(parse(job_text('path = "bad.safetensors"'), inbox, library), "truncated or corrupt")
    wide = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 96),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(96, 2)}
    save_file(wide, str(path))
    fails(parse(job_text('path = "bad.safetensors"'), inbox, library), "another model size")
    for name, model in models.items():
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items()), name


def test_animate_takes_a_wan21_i2v_lora_whole_image_attention_included(tmp_path: Path) -> None:
    """Animate-14B has Wan2.1 I2V's image cross-attention: the k_img/v_img keys of lightx2v's Wan2.1 I2V LoRA
    (the one LightX2V runs Animate with) apply there; nothing is dropped. One model, no expert key."""
    from pipeline.weights.loader import load_animate_dit

    dit = load_animate_dit(FIXTURE / "dit_animate" / "model", torch.float32, "cpu")
    reference = {k: v.clone() for k, v in dit.state_dict().items()}
    modules = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img", "blocks.1.ffn.2"]
    lora = make_lora(dit, modules, 2, seed=4, diffs=[("blocks.0.cross_attn.norm_k_img.weight", "diff")])
    write_original(tmp_path / "wan21_i2v_distill.safetensors", lora)
    job = parse_manifest_text('schema = 1\nkind = "animate"\n[inputs]\ncharacter = "a.png"\nvideo = "v.mp4"\n'
                              '[sampling]\npreset = "lightning-4step"\nseed = 1\n[[lora]]\n'
                              'path = "wan21_i2v_distill.safetensors"\n', "job.toml", tmp_path, check_inputs=False)
    want = expected(dit, [(lora, 1.0)])
    pool = PoolLoras({"dit": dit}, torch.device("cpu"), compiled=False, method="merged")
    run = pool.bind(job)
    pool.apply(run, {"dit": 4}, tokens=64)
    for name in ("blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight"):
        torch.testing.assert_close(dict(dit.named_parameters())[name], want[name], rtol=0, atol=3e-6)
    run.remove()
    assert all(torch.equal(v, reference[k]) for k, v in dit.state_dict().items())
    (item,) = run.describe()
    assert item["experts"] == ["dit"] and "ignored_keys" not in item and item["weights"] == {"dit": 5}


def test_ranks_share_rank_0s_methods_and_local_ranks_share_the_host_memory(setup, monkeypatch) -> None:
    models, library, inbox, *_ = setup
    job = parse(job_text('library = "distill.safetensors"'), inbox, library)
    shared = []

    def rank0(methods: dict) -> dict:  # what the broadcast from rank 0 does: this rank takes rank 0's choice
        shared.append(dict(methods))
        return {name: Method.UNMERGED for name in methods}

    pool = PoolLoras(models, torch.device("cpu"), compiled=False, method="merged", share=rank0)
    run = pool.bind(job)
    pool.apply(run, {}, 36)
    assert shared == [{"high_noise": Method.MERGED, "low_noise": Method.MERGED}]
    assert set(run.applied.methods.values()) == {Method.UNMERGED}
    run.remove()
    rooms = []
    monkeypatch.setattr(pool_loras, "free_host_bytes", lambda: 8 << 30)
    monkeypatch.setattr(pool_loras, "choose_method", lambda loras, **kw: rooms.append(kw["pristine_room_bytes"])
                        or Method.MERGED)
    eight = PoolLoras(models, torch.device("cpu"), compiled=False, local_ranks=8)
    eight._method("high_noise", run.bound, 4, 36)
    assert rooms == [1 << 30]  # 8 GiB free, shared by 8 ranks that each keep their own copies


@pytest.mark.gpu
def test_on_cuda_the_pristine_copies_are_pinned_and_jobs_come_off_bitwise(setup) -> None:
    models, library, inbox, *_ = setup
    cuda = {name: m.to("cuda", torch.bfloat16) for name, m in models.items()}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in cuda.items()}
    job = parse(job_text('library = "distill.safetensors"', 'path = "style.safetensors"\nexpert = "low_noise"'),
                inbox, library)
    pool = PoolLoras(cuda, torch.device("cuda"), compiled=False)
    assert all(store.pin_memory for store in pool.pristine.values())
    for method in ("merged", "unmerged", "merged"):
        pool.method = method
        run = pool.bind(job)
        pool.apply(run, {"high_noise": 2, "low_noise": 2}, 36)
        assert set(run.applied.methods.values()) == {Method(method)}
        run.remove()
        for name, model in cuda.items():
            assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items()), (method, name)
