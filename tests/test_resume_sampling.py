"""Resuming a denoising loop from a sampling checkpoint, and the NaN/Inf watch, on the CPU in float32.

Real models (the reference fixture's two tiny I2V experts and VAE; a tiny random Animate checkpoint), real
checkpoint files in tmp folders. "Interrupted" = the progress callback raises after a step, exactly where a
SIGKILL would leave the file; the resumed run is a new loop with a fresh solver reading that file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from pipeline.i2v import I2VModels, decode_video, prepare_i2v, sample_i2v
from pipeline.sampling import SOLVERS, SolverError, make_solver
from pipeline.sampling.checkpoint import (
    FILE_NAME,
    CheckpointPolicy,
    CheckpointStore,
    Fingerprint,
    decode,
    encode,
    to_state,
)
from pipeline.sampling.moe import HIGH_NOISE, LOW_NOISE, ExpertSwitch
from pipeline.sampling.numerics import FiniteWatch, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread

STEPS = 6
FP = Fingerprint(job="sha256:job-a", model="sha256:model-a")


class Interrupted(Exception):
    """Stands for the process dying right after a step (its checkpoint, if due, is on disk)."""


def stop_after(step: int) -> Any:
    def on_progress(_phase: str, done: int, _total: int, *_clip: int) -> None:
        if done == step:
            raise Interrupted(f"after step {done}")

    return on_progress


def store(folder: Path, fingerprint: Fingerprint = FP, **policy: Any) -> tuple[CheckpointStore, list[str]]:
    logged: list[str] = []
    policy = {"every_steps": 1, "every_seconds": None} | policy
    return CheckpointStore(folder, fingerprint, CheckpointPolicy(**policy), log=logged.append), logged


# ---------------------------------------------------------------------------------------------- solvers alone


def fake_velocity(x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The scheduler fixture's fake model (README: 0.3 x - 0.1 cos(t/1000) x0 + 0.05 sin(3x))."""
    return 0.3 * x - 0.1 * torch.cos(t.float() / 1000) * x0 + 0.05 * torch.sin(3.0 * x)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("split", [1, 2, 7, 20])
def test_a_solver_rebuilt_from_its_state_continues_bitwise(name: str, split: int, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    x0, start = torch.randn(16, 2, 4, 6, generator=gen), torch.randn(16, 2, 4, 6, generator=gen)

    def run(solver: Any, x: torch.Tensor, steps: range) -> torch.Tensor:
        for k in steps:
            x = solver.step(fake_velocity(x, solver.timesteps[k], x0), k, x)
        return x

    whole = run(make_solver(name, 20, 5.0), start, range(20))
    first = make_solver(name, 20, 5.0)
    x = run(first, start, range(split))
    # through the file format: tensors and scalars as they are stored
    state = to_state(*decode(encode(SamplingStateLike(x, first.state_dict()), FP, {})))
    second = make_solver(name, 20, 5.0)
    second.load_state_dict(state.solver)
    assert second.step_index == split
    assert torch.equal(run(second, state.latent, range(split, 20)), whole)


def SamplingStateLike(latent: torch.Tensor, solver: dict) -> Any:  # noqa: N802 - reads as the type it builds
    from pipeline.sampling.checkpoint import SamplingState

    return SamplingState(clip=0, step=solver["step_index"], latent=latent, solver=solver)


def test_a_solver_refuses_a_state_that_is_not_its_own_and_stays_unchanged() -> None:
    unipc = make_solver("unipc", 6, 5.0)
    x = torch.ones(2, 2)
    for k in range(2):
        x = unipc.step(x * 0.5, k, x)
    state = unipc.state_dict()
    other = make_solver("dpm++", 6, 5.0)
    with pytest.raises(SolverError, match="solver state: solver is 'unipc', this solver has 'dpm\\+\\+'"):
        other.load_state_dict(state)
    with pytest.raises(SolverError, match="num_steps is 6, this solver has 8"):
        make_solver("unipc", 8, 5.0).load_state_dict(state)
    fresh = make_solver("unipc", 6, 5.0)
    with pytest.raises(SolverError, match="does not match step_index 1"):  # two predictions after one step?
        fresh.load_state_dict({**state, "step_index": 1})
    with pytest.raises(SolverError, match="step_index 7"):
        fresh.load_state_dict({**state, "step_index": 7})
    assert fresh.step_index == 0 and fresh.x0_history == [] and fresh.last_sample is None


# ---------------------------------------------------------------------------------------------- I2V


@pytest.fixture(scope="module")
def fixture_models(wan_ref: Path) -> I2VModels:
    from pipeline.models.vae import WanVAE
    from pipeline.weights.loader import load_i2v_experts

    high, low = load_i2v_experts(wan_ref / "dit_i2v")
    vae = WanVAE.from_checkpoint(wan_ref / "vae" / "Wan2.1_VAE.pth")
    return I2VModels(high, low, vae, None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def fixture_inputs(wan_ref: Path, fixture_models: I2VModels) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(wan_ref / "pipeline_i2v" / "cases.safetensors"))
    image = Image.open(wan_ref / "pipeline_i2v" / "image.png").convert("RGB")
    return prepare_i2v(fixture_models, image, tensors["context"], tensors["context_null"], max_area=3500,
                       frames=9, seed=42, noise=tensors["noise"])


SWITCH = ExpertSwitch(boundary=0.9, guide_scale=(2.0, 4.5))  # the fixture run's: t >= 900 -> high noise


class ExpertLog:
    """Which expert each forward ran on (forward hooks on the real experts; nothing replaced)."""

    def __init__(self, models: I2VModels) -> None:
        self.calls: list[str] = []
        self.handles = [module.register_forward_hook(lambda *_a, n=name: self.calls.append(n))
                        for name, module in ((HIGH_NOISE, models.high_noise), (LOW_NOISE, models.low_noise))]

    def per_step(self) -> list[str]:
        return self.calls[::2]  # cond then uncond: two forwards per step

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def sample(models: I2VModels, inputs: Any, solver: str, steps: int = STEPS, **kw: Any) -> tuple[torch.Tensor, list]:
    log = ExpertLog(models)
    try:
        latent = sample_i2v(models, inputs, make_solver(solver, steps, 5.0), SWITCH, **kw)
    finally:
        log.close()
    return latent, log.per_step()


@pytest.fixture(scope="module")
def uninterrupted(fixture_models: I2VModels, fixture_inputs: Any) -> dict[str, tuple[torch.Tensor, list]]:
    return {name: sample(fixture_models, fixture_inputs, name) for name in SOLVERS}


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize(("every", "killed_after", "resumes_at"), [(1, 3, 3), (2, 3, 2), (1, 1, 1)])
def test_i2v_resumed_after_an_interruption_is_bitwise_the_uninterrupted_run(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path, name: str, every: int,
    killed_after: int, resumes_at: int,
) -> None:
    whole, experts = uninterrupted[name]
    first, _ = store(tmp_path, every_steps=every)
    with pytest.raises(Interrupted):
        sample(fixture_models, fixture_inputs, name, checkpoint=first, on_progress=stop_after(killed_after))
    assert first.writes == killed_after // every

    second, logged = store(tmp_path, every_steps=every)
    progress: list[tuple] = []
    latent, resumed_experts = sample(fixture_models, fixture_inputs, name, checkpoint=second,
                                     on_progress=lambda *a: progress.append(a))
    assert torch.equal(latent, whole)
    assert resumed_experts == experts[resumes_at:], "forwards run only for the steps left, on the same experts"
    assert [p[1] for p in progress] == list(range(resumes_at, STEPS + 1)), "progress starts at the saved step"
    assert second.resumed_from == {"clip": 0, "step": resumes_at, "expert": experts[resumes_at - 1],
                                   "layout_changed": []}
    assert second.ignored is None and logged == [f"{tmp_path / FILE_NAME}: resuming after step {resumes_at} of 6"]
    assert torch.equal(decode_video(fixture_models, latent), decode_video(fixture_models, whole))


def test_the_expert_switch_lands_on_the_same_step_after_a_resume(uninterrupted: dict) -> None:
    # the cases above resume before (1, 2) and at (3) the fixture's switch; it is where the plan puts it
    assert uninterrupted["unipc"][1] == [HIGH_NOISE] * 3 + [LOW_NOISE] * 3


def test_a_finished_loop_leaves_its_final_state_and_a_rerun_goes_straight_to_decoding(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path
) -> None:
    """The state after the last step is written too: a crash while decoding or writing costs no sampling."""
    first, _ = store(tmp_path, every_steps=None)
    sample(fixture_models, fixture_inputs, "euler", checkpoint=first)
    assert first.writes == 1
    second, _ = store(tmp_path)
    latent, experts = sample(fixture_models, fixture_inputs, "euler", checkpoint=second)
    assert experts == [] and torch.equal(latent, uninterrupted["euler"][0])
    second.clear()
    assert list(tmp_path.iterdir()) == []


def interrupted_checkpoint(models: I2VModels, inputs: Any, folder: Path, after: int = 3) -> Path:
    first, _ = store(folder)
    with pytest.raises(Interrupted):
        sample(models, inputs, "unipc", checkpoint=first, on_progress=stop_after(after))
    return folder / FILE_NAME


def rewrite(path: Path, header_change: dict | None = None, tensor_byte: int | None = None) -> None:
    """Edit a checkpoint file in place: change its JSON header, or flip one byte of its tensor data."""
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    if tensor_byte is not None:
        data[8 + size + tensor_byte] ^= 0xFF
    if header_change is not None:
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"]["wanbox"]) | header_change
        header["__metadata__"]["wanbox"] = json.dumps(meta)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = bytearray(struct.pack("<Q", len(text))) + text + data[8 + size :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("case", "reason"), [
    ("other job", "written for another job or other job parameters/inputs"),
    ("other model", "written with another model or precision"),
    ("other steps", "other sampling parameters: sigmas"),
    ("truncated", "unreadable (truncated: the header needs"),
    ("cut in the tensors", "unreadable (truncated: its tensors need"),
    ("garbage", "unreadable (not a sampling checkpoint"),
    ("empty", "unreadable (0 bytes, shorter than a safetensors header)"),
    ("damaged", "damaged: its contents do not match the checksum"),
    ("header edited", "damaged: its contents do not match the checksum"),
    ("other format", "format 'wanbox-sampling-checkpoint/0', this build reads"),
    ("inconsistent", "inconsistent: clip 0, step 9"),
])
def test_a_checkpoint_that_does_not_belong_to_this_run_is_ignored_with_its_reason(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path, case: str, reason: str
) -> None:
    path = interrupted_checkpoint(fixture_models, fixture_inputs, tmp_path)
    fingerprint, steps = FP, STEPS
    if case == "other job":
        fingerprint = Fingerprint("sha256:job-b", FP.model)
    elif case == "other model":
        fingerprint = Fingerprint(FP.job, "sha256:model-b")
    elif case == "other steps":
        steps = 8
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "cut in the tensors":
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "damaged":
        rewrite(path, tensor_byte=1234)
    elif case == "other format":
        rewrite(path, {"format": "wanbox-sampling-checkpoint/0"})
    elif case == "header edited":
        rewrite(path, {"step": 2})
    elif case == "inconsistent":  # a whole, checksummed file whose step is beyond this run's schedule
        from pipeline.i2v import i2v_loop_key

        key = i2v_loop_key(fixture_inputs, make_solver("unipc", STEPS, 5.0), SWITCH)
        state = to_state(*decode(path.read_bytes()))
        path.write_bytes(encode(dataclasses.replace(state, step=9), FP, key))
    second, logged = store(tmp_path, fingerprint)
    latent, experts = sample(fixture_models, fixture_inputs, "unipc", steps, checkpoint=second)
    assert second.resumed_from is None and len(experts) == steps, "started from the first step"
    assert reason in second.ignored and logged == [second.ignored] and str(path) in second.ignored
    assert second.stats()["checkpoint"]["ignored"] == second.ignored
    if steps == STEPS:
        assert torch.equal(latent, uninterrupted["unipc"][0]), "never applied, not even partly"


def test_a_temp_file_left_by_a_killed_writer_is_removed_and_the_last_whole_file_used(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path
) -> None:
    path = interrupted_checkpoint(fixture_models, fixture_inputs, tmp_path, after=2)
    leftover = tmp_path / f".{FILE_NAME}.0badc0de.tmp"
    leftover.write_bytes(path.read_bytes()[:777])  # a write cut short by the kill
    second, _ = store(tmp_path)
    latent, experts = sample(fixture_models, fixture_inputs, "unipc", checkpoint=second)
    assert not leftover.exists() and second.resumed_from["step"] == 2 and len(experts) == STEPS - 2
    assert torch.equal(latent, uninterrupted["unipc"][0])


def test_a_checkpoint_that_cannot_be_written_is_reported_and_sampling_goes_on(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    broken, logged = store(blocker / "resume")
    latent, _ = sample(fixture_models, fixture_inputs, "dpm++", checkpoint=broken)
    assert torch.equal(latent, uninterrupted["dpm++"][0])
    assert broken.writes == 0 and "could not write the checkpoint" in broken.write_error
    assert logged and all("could not write" in line for line in logged)


def test_a_resume_on_another_layout_says_what_changed_and_that_it_is_not_bitwise(
    fixture_models: I2VModels, fixture_inputs: Any, tmp_path: Path
) -> None:
    first = CheckpointStore(tmp_path, FP, CheckpointPolicy(every_steps=1), layout={"world_size": 1, "ulysses": 1})
    with pytest.raises(Interrupted):
        sample(fixture_models, fixture_inputs, "unipc", checkpoint=first, on_progress=stop_after(2))
    logged: list[str] = []
    second = CheckpointStore(tmp_path, FP, CheckpointPolicy(every_steps=1), layout={"world_size": 4, "ulysses": 4},
                             log=logged.append)
    sample(fixture_models, fixture_inputs, "unipc", checkpoint=second)
    assert second.resumed_from["layout_changed"] == ["ulysses", "world_size"]
    assert "world_size=1" in logged[0] and "world_size=4" in logged[0] and "bitwise" in logged[0]
    assert decode((tmp_path / FILE_NAME).read_bytes())[0]["layout"] == {"world_size": 4, "ulysses": 4}


def test_only_the_writing_rank_touches_the_file_and_every_rank_gets_its_verdict(
    fixture_models: I2VModels, fixture_inputs: Any, uninterrupted: dict, tmp_path: Path
) -> None:
    from pipeline.i2v import i2v_loop_key

    interrupted_checkpoint(fixture_models, fixture_inputs, tmp_path, after=4)
    broadcast: list = []  # what rank 0 hands to the other ranks
    writer = CheckpointStore(tmp_path, FP, share=lambda verdict: broadcast.append(verdict) or verdict)
    solver = make_solver("unipc", STEPS, 5.0)
    assert writer.begin(i2v_loop_key(fixture_inputs, solver, SWITCH), solver) is not None
    verdict = broadcast[0]
    (tmp_path / FILE_NAME).unlink()  # another rank must not need the file
    other = CheckpointStore(tmp_path, None, CheckpointPolicy(every_steps=1), writer=False, share=lambda _: verdict)
    latent, experts = sample(fixture_models, fixture_inputs, "unipc", checkpoint=other)
    assert torch.equal(latent, uninterrupted["unipc"][0]) and len(experts) == 2
    assert other.writes == 0 and not (tmp_path / FILE_NAME).exists()


def test_the_file_holds_float32_tensors_of_the_latent_size_only(
    fixture_models: I2VModels, fixture_inputs: Any, tmp_path: Path
) -> None:
    path = interrupted_checkpoint(fixture_models, fixture_inputs, tmp_path, after=3)
    header, tensors = decode(path.read_bytes())
    assert sorted(tensors) == ["latent", "solver.last_sample", "solver.x0_history.0", "solver.x0_history.1"]
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    latent_bytes = fixture_inputs.noise.numel() * 4
    assert path.stat().st_size < 4 * latent_bytes + 16384  # four latents (UniPC's history) and a header
    assert header["expert"] == HIGH_NOISE and header["step"] == 3 and header["job"] == FP.job


# ---------------------------------------------------------------------------------------------- policy


def test_the_policy_saves_by_steps_or_seconds_whichever_comes_first(tmp_path: Path) -> None:
    now = [0.0]
    s = CheckpointStore(tmp_path, FP, CheckpointPolicy(every_steps=3, every_seconds=10.0), clock=lambda: now[0])
    s.begin({"clips": 1, "steps": 9, "latent_shape": [1]}, make_solver("euler", 9, 5.0))
    due = []
    for seconds in (1, 1, 1, 1, 12, 1, 1, 1):  # wall time of each step
        now[0] += seconds
        due.append(s.tick())
        if due[-1]:
            s.save(SamplingStateLike(torch.zeros(1), make_solver("euler", 9, 5.0).state_dict()))
    assert due == [False, False, True, False, True, False, False, True]
    assert not CheckpointStore(tmp_path, FP, CheckpointPolicy(enabled=False)).tick(final=True)
    assert not CheckpointStore(tmp_path, None, writer=False).tick(final=True), "only the writer saves"


@pytest.mark.parametrize(("kw", "field"), [({"every_steps": 0}, "every_steps"), ({"every_steps": 1.5}, "every_steps"),
                                           ({"every_seconds": -1}, "every_seconds"),
                                           ({"every_seconds": math.inf}, "every_seconds"),
                                           ({"enabled": "yes"}, "enabled")])
def test_a_bad_policy_names_its_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: got"):
        CheckpointPolicy(**kw)


# ---------------------------------------------------------------------------------------------- NaN / Inf


@pytest.fixture
def own_models(wan_ref: Path) -> I2VModels:
    """A private copy of the fixture models: these tests poison weights."""
    from pipeline.models.vae import WanVAE
    from pipeline.weights.loader import load_i2v_experts

    high, low = load_i2v_experts(wan_ref / "dit_i2v")
    return I2VModels(high, low, WanVAE.from_checkpoint(wan_ref / "vae" / "Wan2.1_VAE.pth"), None,
                     torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_latent_fails_naming_its_step_and_expert_and_is_never_checkpointed(
    own_models: I2VModels, fixture_inputs: Any, tmp_path: Path, value: float
) -> None:
    def poison_after_step_3(_phase: str, done: int, _total: int) -> None:
        if done == 3:  # from step 4 on (the low-noise expert's first) the head outputs NaN/Inf
            with torch.no_grad():
                own_models.low_noise.head.head.weight.fill_(value)

    checkpoints, _ = store(tmp_path)
    with pytest.raises(NonFiniteError) as failure:
        sample(own_models, fixture_inputs, "unipc", checkpoint=checkpoints, on_progress=poison_after_step_3)
    err = failure.value
    assert (err.kind, err.retryable, err.where, err.step, err.expert) == ("numerics", False, "latent", 4, LOW_NOISE)
    assert "at sampling step 4 of 6 (expert low_noise_model)" in str(err) and "another solver" in str(err)
    assert decode((tmp_path / FILE_NAME).read_bytes())[0]["step"] == 3, "the last finite state stays on disk"


def test_non_finite_decoded_frames_fail_instead_of_a_black_video(
    own_models: I2VModels, fixture_inputs: Any, uninterrupted: dict
) -> None:
    with torch.no_grad():
        own_models.vae.model.decoder.conv1.bias[0] = math.nan
    with pytest.raises(NonFiniteError, match="decoded frames contain NaN or Inf although every denoising step") as e:
        decode_video(own_models, uninterrupted["euler"][0])
    assert e.value.where == "frames" and e.value.kind == "numerics"


def test_the_watch_syncs_at_its_cadence_but_names_the_first_bad_step() -> None:
    watch = FiniteWatch(10, sync_every=4, expert_of=lambda k: HIGH_NOISE)
    good, bad = torch.zeros(3), torch.tensor([0.0, -math.inf, 1.0])
    watch.observe(0, good)
    watch.observe(1, bad)  # not looked at yet: no sync on this step
    watch.observe(2, good)
    with pytest.raises(NonFiniteError, match="at sampling step 2 of 10 \\(expert high_noise_model\\)"):
        watch.observe(3, good)
    huge = torch.full((1000,), 3e38)  # a float32 sum would overflow to inf; float64 must not
    ok = FiniteWatch(1, sync_every=1)
    ok.observe(0, huge)
    assert ok.finite()


def test_the_resume_bench_runs_tiny_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.bench_resume import main

    assert main(["--tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["resumed_bitwise"] is True and result["resumed_max_abs_diff"] == 0.0
    assert result["checkpoint_bytes"] > 4 * 16 * 3 * 6 * 8 * 4 and result["checkpoint_write_s"] > 0
    assert result["saved_s"] > 0 and 0 < result["saved_fraction"] < 1
