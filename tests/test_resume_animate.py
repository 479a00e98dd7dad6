"""Resuming Animate (several clips, each conditioned on the previous clip's last frames) from a checkpoint, on
the CPU in float32 with a tiny random checkpoint and real src files: bitwise the uninterrupted video.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.animate import AnimateModels, generate_animate
from pipeline.sampling.checkpoint import FILE_NAME, CheckpointPolicy, CheckpointStore, Fingerprint, decode
from pipeline.sampling.numerics import NonFiniteError
from pipeline.weights.tiny import write_animate
from tests.test_animate_generate import DiTSpy, write_src

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread

STEPS = 3
FP = Fingerprint(job="sha256:animate-job", model="sha256:tiny-animate")
# 15 frames, clip_len 9, refert 5 -> padded to 17 -> three clips; clip 2's and 3's noise come from the one
# generator after clip 1's draw, so a resume inside clip 2 must restore the generator to get clip 3 right.
JOB = dict(mode="animation", clip_len=9, refert_num=5, steps=STEPS, seed=11)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_animate(tmp_path_factory.mktemp("animate_ckpt"), seed=5)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_src(tmp_path_factory.mktemp("src"), 15, seed=4)


@pytest.fixture(scope="module")
def models(ckpt: Path) -> AnimateModels:
    return AnimateModels.load(ckpt)


def run(models: AnimateModels, src: Path, on_progress: Any = None, **kw: Any) -> tuple[torch.Tensor, DiTSpy, list]:
    spy = DiTSpy(models.dit)
    progress: list[tuple] = []

    def record(*report: Any) -> None:
        progress.append(report)
        if on_progress is not None:
            on_progress(*report)

    video = generate_animate(dataclasses.replace(models, dit=spy), src, on_progress=record, **JOB | kw)
    return video, spy, progress


def checkpoints(folder: Path, **policy: Any) -> CheckpointStore:
    return CheckpointStore(folder, FP, CheckpointPolicy(**{"every_steps": 1, "every_seconds": None} | policy),
                           log=lambda _line: None)


def interrupt_at(global_step: int) -> Any:
    def on_progress(phase: str, step: int, _total: int, _clip: int) -> None:
        if phase == "sampling" and step == global_step:
            raise Interrupted

    return on_progress


@pytest.fixture(scope="module")
def uninterrupted(models: AnimateModels, src: Path) -> tuple[torch.Tensor, DiTSpy, list[tuple]]:
    return run(models, src)


@pytest.mark.parametrize(("policy", "killed_at", "resumed_from"), [
    ({}, 5, {"clip": 1, "step": 2}),  # inside the second clip, a checkpoint after every step
    ({"every_steps": None}, 5, {"clip": 0, "step": 3}),  # only the end-of-clip saves: clip 2 runs again
    ({}, 7, {"clip": 2, "step": 1}),  # inside the third clip: two finished clips decoded again
])
def test_animate_resumed_inside_a_later_clip_is_bitwise_the_uninterrupted_video(
    models: AnimateModels, src: Path, uninterrupted: tuple, tmp_path: Path, policy: dict, killed_at: int,
    resumed_from: dict,
) -> None:
    whole, whole_spy, _ = uninterrupted
    with pytest.raises(Interrupted):
        run(models, src, checkpoint=checkpoints(tmp_path, **policy), on_progress=interrupt_at(killed_at))
    second = checkpoints(tmp_path, **policy)
    video, spy, progress = run(models, src, checkpoint=second)
    assert torch.equal(video, whole)
    done = resumed_from["clip"] * STEPS + resumed_from["step"]
    assert len(spy.calls) == len(whole_spy.calls) - done, "only the steps left were sampled"
    assert [c["t"] for c in spy.calls] == [c["t"] for c in whole_spy.calls[done:]]
    for got, expected in zip(spy.calls, whole_spy.calls[done:], strict=True):
        assert torch.equal(got["x"], expected["x"]) and torch.equal(got["y"], expected["y"])
    assert [p[1] for p in progress if p[0] == "sampling"] == list(range(done, 3 * STEPS + 1))
    assert [p[1] for p in progress if p[0] == "decoding"] == [1, 2, 3]
    assert second.resumed_from == {**resumed_from, "expert": None, "layout_changed": []}


def test_the_checkpoint_carries_the_generator_and_the_finished_clips(
    models: AnimateModels, src: Path, tmp_path: Path
) -> None:
    with pytest.raises(Interrupted):
        run(models, src, checkpoint=checkpoints(tmp_path), on_progress=interrupt_at(7))
    header, tensors = decode((tmp_path / FILE_NAME).read_bytes())
    assert (header["clip"], header["step"], header["finished"], header["rng"]) == (2, 1, 2, True)
    assert tensors["rng"].dtype == torch.uint8 and tensors["finished.0"].shape == tensors["latent"].shape
    assert header["loop"]["starts"] == [0, 4, 8] and header["loop"]["clips"] == 3


def test_a_checkpoint_of_other_animate_parameters_is_ignored(
    models: AnimateModels, src: Path, tmp_path: Path
) -> None:
    with pytest.raises(Interrupted):
        run(models, src, checkpoint=checkpoints(tmp_path), on_progress=interrupt_at(4))
    second = checkpoints(tmp_path)
    _, spy, _ = run(models, src, checkpoint=second, refert_num=1, clip_len=5)
    assert second.resumed_from is None and "other sampling parameters" in second.ignored
    assert "refert_num 5 there, 1 now" in second.ignored and "starts" in second.ignored


def test_a_non_finite_latent_in_a_later_clip_names_the_clip_and_step(ckpt: Path, src: Path, tmp_path: Path) -> None:
    own = AnimateModels.load(ckpt)  # poisoned below: not the module's models

    def poison(phase: str, step: int, _total: int, _clip: int) -> None:
        if phase == "sampling" and step == 4:  # after clip 2's first step
            with torch.no_grad():
                own.dit.head.head.weight.fill_(math.nan)

    with pytest.raises(NonFiniteError, match="at sampling step 2 of 3 \\(clip 2 of 3\\)") as failure:
        run(own, src, checkpoint=checkpoints(tmp_path), on_progress=poison)
    assert (failure.value.clip, failure.value.step, failure.value.kind) == (1, 2, "numerics")
    assert decode((tmp_path / FILE_NAME).read_bytes())[0]["step"] == 1, "the NaN state is never saved"
