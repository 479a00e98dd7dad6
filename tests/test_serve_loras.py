"""LoRA jobs end to end through `wanbox serve` with the REAL warm pool (torchrun, gloo, tiny random I2V model):
a 4-step preset job with a library pair carrying lightx2v's image-attention keys, uploads in every published
layout, and bad LoRA files that each end in failed/<name>/error.txt with the exact reason while the daemon stays
up. One daemon for every case (the suite's time budget).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import MEDIA
from tests.lora_writers import (
    BLOCK_LINEARS,
    make_lora,
    write_diffusers,
    write_kohya,
    write_original,
    write_peft_dir,
)
from tests.test_serve_real_pool import sidecar_of
from tests.workers.harness import Root, real_pool, wait_for, write_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HEAD = 'schema = 1\nkind = "i2v"\nprompt = "a cat"\n[inputs]\nimage = "cat.jpg"\n[video]\nsize = "832*480"\nframes = 5\n'
PLAIN = "[sampling]\nsteps = 2\nseed = 3\n"
PRESET = '[sampling]\npreset = "lightning-4step"\nseed = 3\n'


def lora_block(**keys: object) -> str:
    return "[[lora]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def drop(root: Root, name: str, text: str, files: dict[str, Path] | None = None) -> None:
    """The folder layout: media and LoRA files first, job.toml last (renamed into place)."""
    folder = root.inbox / name
    folder.mkdir()
    shutil.copyfile(MEDIA / "i2v_input.jpg", folder / "cat.jpg")
    for rel, source in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / rel)
    (folder / ".job.toml.tmp").write_text(text)
    os.rename(folder / ".job.toml.tmp", folder / "job.toml")


def error_text(root: Root, name: str) -> str:
    """failed/<name>/error.txt (written just after the ledger records the failure)."""
    path = root.failed / name / "error.txt"
    wait_for(path.is_file, 30, f"{path} never appeared")
    return path.read_text()


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint and LoRA files for it: a distillation-like pair (with k_img/v_img/norm_k_img keys),
    style LoRAs in each published layout, and broken ones."""
    from pipeline.weights.loader import load_dit

    out = tmp_path_factory.mktemp("serve-loras")
    ckpt = write_tiny_checkpoint(out / "tiny-i2v", "i2v")
    model = load_dit(ckpt / "high_noise_model", torch.float32, "cpu")
    dim = model.config.dim
    files: dict[str, Path] = {}
    every = [f"blocks.{i}.{m}" for i in (0, 1) for m in BLOCK_LINEARS]
    for seed, expert in enumerate(("high", "low")):
        pair = make_lora(model, every, 4, seed=seed, alpha=4.0, diffs=[("head.modulation", "diff_m")])
        path = write_original(out / f"lightning_{expert}.safetensors", pair)
        state = load_file(str(path))
        for block in (0, 1):  # what lightx2v's Wan2.2 I2V LoRAs carry although Wan2.2 I2V has no image attention
            state[f"diffusion_model.blocks.{block}.cross_attn.k_img.lora_down.weight"] = torch.ones(4, dim)
            state[f"diffusion_model.blocks.{block}.cross_attn.k_img.lora_up.weight"] = torch.ones(dim, 4)
            state[f"diffusion_model.blocks.{block}.cross_attn.norm_k_img.diff"] = torch.ones(dim)
        save_file(state, str(path))
        files[f"lightning_{expert}"] = path
    style = make_lora(model, ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.0.cross_attn.o"], 2, seed=7,
                      alpha=1.0)
    files["kohya"] = write_kohya(out / "kohya.safetensors", style)
    files["diffusers"] = write_diffusers(out / "diffusers.safetensors", style, alpha=1.0, rank=2)
    files["peft"] = write_peft_dir(out / "adapter", style, alpha=1.0)
    files["peft_config"] = out / "adapter" / "adapter_config.json"
    files["comfy"] = write_original(out / "comfy.safetensors", style, ab=True)
    files["wider"] = _save(out / "wider.safetensors", {  # made for a model of another width
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, dim + 16),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(dim + 16, 2)})
    files["unmapped"] = _save(out / "unmapped.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(dim, 2),
        "diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.ones(2, dim),
        "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.ones(dim, 2)})
    files["rank"] = _save(out / "rank.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(dim, 3)})
    truncated = out / "truncated.safetensors"
    truncated.write_bytes(files["kohya"].read_bytes()[:-64])
    files["truncated"] = truncated
    return ckpt, files


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def test_lora_and_preset_jobs_through_serve_and_bad_loras_fail_with_their_reason(tmp_path: Path, loras) -> None:
    ckpt, files = loras
    root = Root(tmp_path, pool=real_pool("i2v-A14B", ckpt, 1, "--max-area", "4096"), jobs={"max_attempts": 2})
    library = root.root / "models" / "loras"
    (library / "lightning").mkdir(parents=True)
    for expert in ("high", "low"):
        shutil.copyfile(files[f"lightning_{expert}"], library / "lightning" / f"{expert}_noise_model.safetensors")
    shutil.copyfile(files["kohya"], library / "kohya.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(files["kohya"], outside)
    os.symlink(outside, library / "escape.safetensors")
    good = {
        "distilled": PRESET + lora_block(library="lightning/high_noise_model.safetensors", expert="high_noise")
        + lora_block(library="lightning/low_noise_model.safetensors", expert="low_noise"),
        "kohya": PLAIN + lora_block(path="style.safetensors", strength=0.8),
        "diffusers": PLAIN + lora_block(path="style.safetensors", expert="low_noise"),
        "peft": PLAIN + lora_block(path="adapter/adapter_model.safetensors", expert="high_noise"),
        "comfy": PLAIN + lora_block(path="style.safetensors", strength=-0.5),
    }
    uploads = {"kohya": {"style.safetensors": files["kohya"]}, "diffusers": {"style.safetensors": files["diffusers"]},
               "peft": {"adapter/adapter_model.safetensors": files["peft"],
                        "adapter/adapter_config.json": files["peft_config"]},
               "comfy": {"style.safetensors": files["comfy"]}}
    in_pool = {"wider": "another model size", "unmapped": "map to no weight", "rank": "ranks 4 and 3 differ",
               "truncated": "truncated or corrupt"}
    at_intake = {
        "dotdot": (lora_block(library="../outside.safetensors"), 'lora[0].library = "../outside.safetensors"',
                   'without ".."'),
        "escape": (lora_block(library="escape.safetensors"), "lora[0].library", "outside it (symbolic link)"),
        "absent": (lora_block(library="nope.safetensors"), "none of that name; it has", "kohya.safetensors"),
        "mismatch": (lora_block(library="kohya.safetensors", sha256="ab" * 32), "lora[0].library",
                     "a different version of the LoRA?"),
    }
    try:
        root.serve()
        for name, sampling in good.items():
            drop(root, name, HEAD + sampling, uploads.get(name))
        for name in in_pool:
            drop(root, name, HEAD + PLAIN + lora_block(path="bad.safetensors"), {"bad.safetensors": files[name]})
        for name, (block, *_) in at_intake.items():
            drop(root, name, HEAD + PLAIN + block)

        for name, (_block, *needles) in at_intake.items():  # rejected at validation/acceptance, never queued
            root.wait_state(name, "rejected", timeout=60)
            text = error_text(root, name)
            assert all(needle in text for needle in needles), text
        for name, reason in in_pool.items():  # failed by the pool before sampling, not retried
            job = root.wait_state(name, ("failed", "done"), timeout=300)
            assert job.state.value == "failed" and job.attempts == 1, (name, job.last_error)
            text = error_text(root, name)
            assert "lora[0]: " in text and "bad.safetensors" in text and reason in text, text
            assert (root.failed / name / "bad.safetensors").is_file()  # the upload went to failed/ with the job
        for name in good:
            job = root.wait_state(name, ("done", "failed"), timeout=300)
            assert job.state.value == "done", (name, job.last_error)

        distilled = sidecar_of(root, "distilled")
        assert distilled["parameters"]["sampling"]["preset"] == "lightning-4step"
        assert distilled["parameters"]["sampling"]["steps"] == 4 and distilled["video"]["frames"] == 5
        high, low = distilled["loras"]
        assert (high["file"], high["experts"], low["experts"]) == ("high_noise_model.safetensors", ["high_noise"],
                                                                   ["low_noise"])
        assert high["ignored_keys"]["count"] == {"high_noise": 6}
        assert "diffusion_model.blocks.*.cross_attn.k_img.lora_down.weight" in high["ignored_keys"]["keys"]
        assert len(high["sha256"]) == 64 and set(high["method"]) == {"high_noise"}
        assert "dropped {'high_noise': 6} image cross-attention keys" in root.log_text()
        formats = {name: sidecar_of(root, name)["loras"][0]["format"] for name in uploads}
        assert formats == {"kohya": "kohya", "diffusers": "diffusers", "peft": "peft", "comfy": "original"}
        assert sidecar_of(root, "kohya")["loras"][0]["experts"] == ["high_noise", "low_noise"]
        with root.ledger() as ledger:
            stored = ledger.get(root.job("kohya").id).job.loras[0]
        assert stored.source == "upload" and stored.path.is_relative_to(root.work)  # moved into work/ at acceptance

        root.drop("still-up", HEAD + PLAIN, folder=True)
        assert root.wait_state("still-up", ("done", "failed"), timeout=120).state.value == "done"
        assert root.proc is not None and root.proc.poll() is None
        assert root.stop() == 0
    finally:
        root.cleanup()
