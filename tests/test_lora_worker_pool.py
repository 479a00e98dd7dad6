"""Per-job LoRAs on the real warm pool (torchrun, 2 gloo ranks, tiny random I2V checkpoint) driven over its socket:
every rank binds the job's LoRAs, the method per expert is reported, and after a LoRA job (merged, unmerged, or
cancelled mid-sampling) the next job without LoRAs gives bitwise the video of a fresh pool.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from daemon import protocol
from inbox_schema import parse_manifest_text
from pipeline.video import read_mp4
from tests.lora_writers import BLOCK_LINEARS, make_lora, write_kohya, write_original
from tests.test_worker_pool import IMAGE, Supervisor
from tests.workers.harness import write_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A tiny checkpoint, a LoRA library with a distillation-like pair (every block Linear, norm/bias/modulation
    diffs) and a style LoRA whose cost rule says unmerged (one hooked Linear, large full-tensor diffs)."""
    import torch

    from pipeline.weights.loader import load_dit

    out = Path(tempfile.mkdtemp(prefix="wanbox-lora-pool-"))
    ckpt = write_tiny_checkpoint(out / "ckpt", "i2v")
    library = out / "models" / "loras"
    library.mkdir(parents=True)
    for seed, expert in enumerate(("high_noise", "low_noise")):
        model = load_dit(ckpt / f"{expert}_model", torch.float32, "cpu")
        every = [f"blocks.{i}.{m}" for i in (0, 1) for m in BLOCK_LINEARS]
        lora = make_lora(model, every, 4, seed=seed, alpha=4.0,
                         diffs=[("blocks.0.norm3.bias", "diff_b"), ("head.modulation", "diff_m")])
        write_original(library / f"distill_{expert}.safetensors", lora)
    style = make_lora(model, ["blocks.0.self_attn.q"], 2, seed=9, alpha=2.0,
                      diffs=[(f"blocks.{i}.ffn.{j}.weight", "diff") for i in (0, 1) for j in (0, 2)])
    write_kohya(library / "style.safetensors", style)
    yield ckpt, library
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(setup, tmp_path_factory):
    sup = Supervisor(tmp_path_factory.mktemp("lora-pool"), setup[0])
    sup.until(("ready",))
    yield sup
    sup.close()


def run(pool: Supervisor, library: Path, job: str, sampling: str = "steps = 2\n", loras: str = "") -> protocol.Run:
    text = (f'schema = 1\nkind = "i2v"\nname = "{job}"\nprompt = "a lighthouse at dusk"\n[inputs]\nimage = "cat.jpg"\n'
            f'[video]\nsize = "832*480"\nframes = 5\n[sampling]\nseed = 42\n{sampling}{loras}')
    spec = parse_manifest_text(text, f"{job}.toml", Path("/inbox"), check_inputs=False, lora_library=library)
    message = protocol.Run(job=job, kind="i2v", params=spec, inputs={"image": str(IMAGE)},
                           output=str(pool.workdir / f"{job}.mp4"))
    pool.chan.send(message)
    return message


def done(pool: Supervisor) -> dict:
    msg, _ = pool.until(("done", "error"))
    assert msg["type"] == "done", f"{msg}\n{pool.logs()}"
    return msg


DISTILL = ('[[lora]]\nlibrary = "distill_high_noise.safetensors"\nexpert = "high_noise"\n'
           '[[lora]]\nlibrary = "distill_low_noise.safetensors"\nexpert = "low_noise"\n')
STYLE = '[[lora]]\nlibrary = "style.safetensors"\nstrength = 0.7\n'


def test_lora_jobs_leave_the_pool_bitwise_as_fresh(pool, setup) -> None:
    _, library = setup
    run(pool, library, "fresh")
    fresh = read_mp4(done(pool)["output"])[0]

    run(pool, library, "distill", sampling='preset = "lightning-4step"\n', loras=DISTILL)
    message = done(pool)
    stats = message["stats"]
    high, low = stats["loras"]
    assert (high["file"], high["experts"], high["method"]) == ("distill_high_noise.safetensors", ["high_noise"],
                                                               {"high_noise": "merged"})
    assert (low["experts"], low["method"], low["format"]) == (["low_noise"], {"low_noise": "merged"}, "original")
    assert stats["lora_switch_seconds"]["apply"] > 0 and stats["lora_switch_seconds"]["remove"] > 0
    distilled = read_mp4(message["output"])[0]
    assert distilled.shape == fresh.shape and not np.array_equal(distilled, fresh)

    run(pool, library, "after-merged")
    assert np.array_equal(read_mp4(done(pool)["output"])[0], fresh), "a merged LoRA left a trace"

    run(pool, library, "style", loras=STYLE)
    (style,) = done(pool)["stats"]["loras"]
    assert (style["format"], style["strength"]) == ("kohya", 0.7)
    assert style["method"] == {"high_noise": "unmerged", "low_noise": "unmerged"}  # the cost rule's choice
    run(pool, library, "after-unmerged")
    assert np.array_equal(read_mp4(done(pool)["output"])[0], fresh), "unmerged hooks left a trace"

    run(pool, library, "cancelled", sampling="steps = 30\n", loras=DISTILL)
    while True:
        msg = pool.recv()
        if msg["type"] == "progress" and msg["phase"] == "sampling" and msg["step"] >= 1:
            break
    pool.chan.send(protocol.Cancel(job="cancelled"))
    error, _ = pool.until(("done", "error"))
    assert error["kind"] == "cancelled", error
    run(pool, library, "after-cancel")
    assert np.array_equal(read_mp4(done(pool)["output"])[0], fresh), "a cancelled LoRA job left a trace"


def test_a_bad_lora_fails_its_job_on_every_rank_and_the_pool_stays_up(pool, setup) -> None:
    _, library = setup
    (library / "broken.safetensors").write_bytes((library / "style.safetensors").read_bytes()[:300])
    run(pool, library, "broken", loras='[[lora]]\nlibrary = "broken.safetensors"\n')
    error, seen = pool.until(("done", "error"))
    assert (error["type"], error["kind"], error["retryable"]) == ("error", "input", False)
    assert error["message"].startswith("lora[0]: ") and "broken.safetensors" in error["message"]
    assert "truncated or corrupt" in error["message"]
    assert not [m for m in seen if m["type"] == "progress" and m["phase"] == "sampling" and m["step"] > 0]
    run(pool, library, "after-broken")
    assert done(pool)["stats"]["loras"] == []
