"""Every manifest field of every kind (LoRAs and presets too), walked from TOML to the call that consumes it: the
real parser, a real SQLite ledger, the real protocol, the kind's real preparation and pool family on tiny models (in
this process, with spies that record each consuming call and then make it), and the outbox's sidecar.

A field dropped or changed anywhere on the way (the Animate `timesteps` once were) fails here.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from daemon import protocol
from daemon.ledger import Ledger
from daemon.outbox import sidecar
from daemon.preprocessing import PreprocessFailed, PrepSettings, prepare_job
from daemon.states import JobState
from inbox_schema import Job, parse_manifest_text
from tests.test_worker_animate import write_src
from tests.test_worker_pool import IMAGE, MAX_AREA
from tests.workers.harness import write_image, write_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread"), pytest.mark.timeout(300)]
S = JobState

I2V = """schema = 1
kind = "i2v"
name = "walk-i2v"
priority = 7
prompt = "a red kite over the dunes"
negative_prompt = "blurry, low quality"

[inputs]
image = { path = "media/kite.png", sha256 = "SHA" }

[video]
size = "480*832"
frames = 9
fps = 12

[sampling]
shift = 3.0
guide_scale = [2.0, 4.5]
solver = "euler"
seed = 1234
boundary = 0.8
timesteps = [1000, 600, 300]
"""

ANIMATE = """schema = 1
kind = "animate"
name = "walk-animate"
priority = -3
prompt = "a dancer on a rooftop"
negative_prompt = "static, dull"

[inputs]
character = "hero.png"
video = "dance.mp4"

[video]
size = "720*1280"
fps = 24

[sampling]
steps = 2
shift = 4.0
guide_scale = 1.5
solver = "euler"
seed = 99
timesteps = [1000, 500]

[animate]
mode = "animation"
refert_num = 5
clip_len = 9
retarget = true
relighting_lora = true
preprocess_fps = 24
"""


class Spy:
    """Records each call of a function, then makes it (or raises `stop` instead, ending the walk there)."""

    def __init__(self, real: Callable[..., Any], stop: BaseException | None = None) -> None:
        self.real, self.stop, self.calls = real, stop, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if self.stop is not None:
            raise self.stop
        return self.real(*args, **kwargs)

    @property
    def one(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, stop: BaseException | None = None) -> Spy:
    recorder = Spy(getattr(module, name), stop)
    monkeypatch.setattr(module, name, recorder)
    return recorder


def through_ledger_and_protocol(job: Job, tmp_path: Path, inputs: dict[str, str]) -> tuple[Any, Job]:
    """Store the job as the ledger does, read it back, send it as the pool's `run` command, decode it."""
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        row = ledger.add_staged(job.name, "unknown", tmp_path / "m.toml", None)
        assert ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", name=job.name, kind=job.kind,
                                 model_id=job.model_id, priority=job.priority, params_json=job.to_dict(),
                                 work_dir=str(tmp_path))
        record = ledger.get(row.id)
    assert record.job == job and record.priority == job.priority and record.model_id == job.model_id
    run = protocol.Run(job=record.id, kind=record.kind, params=record.job, inputs=inputs, output="/o.mp4")
    received = protocol.to_message(protocol.decode(protocol.encode(run)))
    assert received == run
    return record, received.params


@pytest.fixture()
def ranks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """This process as a pool of one (gloo), as pipeline.worker sets it up."""
    from pipeline.worker import parse_args, set_up

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    yield set_up(parse_args(["--model", "i2v-A14B", "--socket", "/unused", "--checkpoint-dir", "/unused",
                             "--device", "cpu"]))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints() -> Iterator[dict[str, Path]]:
    out = Path(tempfile.mkdtemp(prefix="wanbox-walk-"))
    yield {"i2v": write_tiny_checkpoint(out / "i2v", "i2v"), "animate": write_tiny_checkpoint(out / "animate", "animate")}
    shutil.rmtree(out, ignore_errors=True)


def family_args(model: str, ckpt: Path, *extra: str) -> Any:
    from pipeline.worker import parse_args

    return parse_args(["--model", model, "--socket", "/unused", "--checkpoint-dir", str(ckpt), "--device", "cpu",
                       *extra])


class Report:
    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        pass


def test_every_i2v_field_reaches_its_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranks: Any,
                                              checkpoints: dict[str, Path]) -> None:
    import pipeline.i2v
    import pipeline.preprocess.image
    import pipeline.sampling
    import pipeline.sampling.moe
    from inbox_schema import file_sha256
    from pipeline.families.i2v import I2VFamily

    image = write_image(tmp_path / "inbox" / "media" / "kite.png")
    shutil.copy(IMAGE, image)
    text = I2V.replace("SHA", file_sha256(image))
    job = parse_manifest_text(text, "walk.toml", tmp_path / "inbox")

    # 1. validation resolved every field as written
    assert (job.kind, job.name, job.priority, job.prompt, job.negative_prompt) == (
        "i2v", "walk-i2v", 7, "a red kite over the dunes", "blurry, low quality")
    assert (job.inputs["image"].path, job.inputs["image"].sha256) == (image, file_sha256(image))
    assert (job.video.size, job.video.frames, job.video.fps) == ("480*832", 9, 12)
    s = job.sampling
    assert (s.steps, s.shift, s.guide_scale, s.solver, s.seed, s.boundary, s.timesteps) == (
        3, 3.0, (2.0, 4.5), "euler", 1234, 0.8, (1000, 600, 300))

    # 2. the preprocessing call
    prepare = spy(monkeypatch, pipeline.preprocess.image, "prepare_image")
    record = prepare_job(job, str(tmp_path), PrepSettings())
    (src, _dest, area), _ = prepare.one
    assert Path(src) == image and area == 480 * 832

    # 3. ledger and protocol, then the family's sampling calls
    row, received = through_ledger_and_protocol(job, tmp_path, record["inputs"])
    prompts = spy(monkeypatch, pipeline.i2v, "encode_prompts")
    prepared = spy(monkeypatch, pipeline.i2v, "prepare_i2v")
    solver = spy(monkeypatch, pipeline.sampling, "make_solver")
    switch = spy(monkeypatch, pipeline.sampling.moe, "ExpertSwitch")
    family = I2VFamily(family_args("i2v-A14B", checkpoints["i2v"], "--max-area", str(MAX_AREA)), ranks)
    family.load()
    result = family.run(received, record["inputs"], Report(), lambda: False)
    assert prompts.calls[0][0][1:] == ("a red kite over the dunes", "blurry, low quality")  # then as embeddings
    args, kwargs = prepared.one
    assert args[1] == record["inputs"]["image"]
    assert (kwargs["max_area"], kwargs["frames"], kwargs["seed"]) == (min(480 * 832, MAX_AREA), 9, 1234)
    assert solver.one[0] == ("euler", 3, 3.0, (1000, 600, 300))
    assert switch.one[1] == {"boundary": 0.8, "guide_scale": (2.0, 4.5)}
    assert (result["fps"], result["frames"], result["seed"], result["video"].shape[1]) == (12.0, 9, 1234, 9)

    # 4. the outbox: the name, the sidecar's parameters and inputs
    document = sidecar(row, {}, {}, checkpoints["i2v"])
    assert document["name"] == "walk-i2v" and document["seed"] == 1234
    assert Job.from_dict(document["parameters"]) == job
    assert document["inputs"]["image"] == {"role": "image", "relpath": "media/kite.png",
                                           "sha256": file_sha256(image), "size": None}


def test_every_animate_field_reaches_its_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranks: Any,
                                                  checkpoints: dict[str, Path]) -> None:
    import pipeline.animate
    import pipeline.preprocess.animate.job as animate_prep
    from pipeline.families.animate import AnimateFamily

    job = parse_manifest_text(ANIMATE, "walk.toml", tmp_path / "inbox", check_inputs=False)
    o, s = job.options, job.sampling
    assert (job.kind, job.name, job.priority, job.prompt, job.negative_prompt) == (
        "animate", "walk-animate", -3, "a dancer on a rooftop", "static, dull")
    assert (job.video.size, job.video.fps) == ("720*1280", 24)
    assert (s.steps, s.shift, s.guide_scale, s.solver, s.seed, s.timesteps) == (2, 4.0, 1.5, "euler", 99, (1000, 500))
    assert dataclasses.astuple(o) == ("animation", 5, 9, True, True, 24)

    # the preprocessing call (mediapipe itself is exercised by the preprocessing tests: the walk ends here)
    reached = RuntimeError("walk: the preprocessing call was reached")
    preprocess = spy(monkeypatch, animate_prep, "preprocess_animate_job", stop=reached)
    with pytest.raises(PreprocessFailed, match="walk: the preprocessing call was reached"):
        prepare_job(job, str(tmp_path), PrepSettings(mediapipe_dir=tmp_path / "mp", pose_model="full"))
    (video, character, _out), kwargs = preprocess.one
    assert (video, character) == (job.inputs["video"].path, job.inputs["character"].path)
    assert (kwargs["mode"], kwargs["resolution_area"], kwargs["fps"], kwargs["retarget"]) == (
        "animation", (720, 1280), 24, True)
    assert (kwargs["models_dir"], kwargs["pose_variant"]) == (tmp_path / "mp", "full")

    inputs = write_src(tmp_path / "animate", frames=7)
    row, received = through_ledger_and_protocol(job, tmp_path, inputs)
    prompts = spy(monkeypatch, pipeline.animate, "encode_prompts")
    generate = spy(monkeypatch, pipeline.animate, "generate_animate")
    family = AnimateFamily(family_args("animate-14B", checkpoints["animate"]), ranks)
    family.load()
    result = family.run(received, inputs, Report(), lambda: False)
    assert prompts.calls[0][0][1:] == ("a dancer on a rooftop", "static, dull")  # then as embeddings
    kwargs = generate.one[1]
    assert {k: kwargs[k] for k in ("mode", "clip_len", "refert_num", "steps", "shift", "guide_scale", "solver",
                                   "timesteps", "seed", "relighting_lora")} == {
        "mode": "animation", "clip_len": 9, "refert_num": 5, "steps": 2, "shift": 4.0, "guide_scale": 1.5,
        "solver": "euler", "timesteps": (1000, 500), "seed": 99, "relighting_lora": True}
    assert (result["fps"], result["seed"], result["frames"]) == (24.0, 99, 7)
    assert result["relighting"] == "applied"  # relighting_lora = true, and the tiny checkpoint ships the LoRA

    document = sidecar(row, {"relighting": result["relighting"]}, {}, checkpoints["animate"])
    assert Job.from_dict(document["parameters"]) == job and document["name"] == "walk-animate"
    assert document["relighting"] == "applied" and document["loras"] == []


LORAS = """schema = 1
kind = "i2v"
name = "walk-loras"
prompt = "a red kite over the dunes"

[inputs]
image = "kite.png"

[video]
size = "480*832"
frames = 5

[sampling]
preset = "lightning-4step"
shift = 4.0
seed = 77

[[lora]]
library = "pair/high.safetensors"
expert = "high_noise"
strength = 0.9
sha256 = "SHA"

[[lora]]
path = "loras/style.safetensors"
strength = -0.4
"""


def test_every_lora_and_preset_field_reaches_its_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          ranks: Any, checkpoints: dict[str, Path]) -> None:
    import torch

    import pipeline.families.loras as pool_loras
    import pipeline.sampling
    import pipeline.sampling.moe
    from inbox_schema import file_sha256
    from pipeline.families.i2v import I2VFamily
    from pipeline.weights.loader import load_dit
    from pipeline.worker import JobReport, done_message
    from tests.lora_writers import BLOCK_LINEARS, make_lora, write_kohya, write_original

    library, inbox = tmp_path / "models" / "loras", tmp_path / "inbox"
    (library / "pair").mkdir(parents=True)
    (inbox / "loras").mkdir(parents=True)
    model = load_dit(checkpoints["i2v"] / "high_noise_model", torch.float32, "cpu")
    high = write_original(library / "pair" / "high.safetensors",
                          make_lora(model, [f"blocks.0.{m}" for m in BLOCK_LINEARS], 4, seed=1, alpha=2.0))
    style = write_kohya(inbox / "loras" / "style.safetensors", make_lora(model, ["blocks.1.ffn.0"], 2, seed=2))
    shutil.copy(IMAGE, write_image(inbox / "kite.png"))
    job = parse_manifest_text(LORAS.replace("SHA", file_sha256(high)), "walk.toml", inbox, lora_library=library)

    # 1. validation: the preset's values under the manifest's own, each LoRA as written
    s = job.sampling
    assert (s.preset, s.steps, s.solver, s.timesteps, s.shift, s.guide_scale, s.boundary, s.seed) == (
        "lightning-4step", 4, "euler", (1000, 750, 500, 250), 4.0, (1.0, 1.0), 0.9, 77)
    first, second = job.loras
    assert (first.source, first.file, first.path, first.strength, first.experts, first.sha256) == (
        "library", "pair/high.safetensors", library / "pair" / "high.safetensors", 0.9, ("high_noise",),
        file_sha256(high))
    assert (second.source, second.file, second.path, second.strength, second.experts) == (
        "upload", "loras/style.safetensors", style.resolve(), -0.4, ("high_noise", "low_noise"))
    # acceptance records the upload's sha256 (the daemon's intake moves it with the image; tests/test_serve_loras.py)
    files = job.files()
    job = job.with_files({**files, "lora[1]": dataclasses.replace(files["lora[1]"], sha256=file_sha256(style))})

    # 2. ledger and protocol, then the family's LoRA and sampling calls
    record = prepare_job(job, str(tmp_path), PrepSettings())
    row, received = through_ledger_and_protocol(job, tmp_path, record["inputs"])
    reads = spy(monkeypatch, pool_loras, "read_lora")
    binds = spy(monkeypatch, pool_loras, "bind_requests")
    applies = spy(monkeypatch, pool_loras, "apply_loras")
    solver = spy(monkeypatch, pipeline.sampling, "make_solver")
    switch = spy(monkeypatch, pipeline.sampling.moe, "ExpertSwitch")
    family = I2VFamily(family_args("i2v-A14B", checkpoints["i2v"], "--max-area", str(MAX_AREA)), ranks)
    family.load()
    result = family.run(received, record["inputs"], Report(), lambda: False)
    assert [Path(args[0]) for args, _ in reads.calls] == [first.path, job.loras[1].path]
    requests = binds.one[0][0]
    assert [(r.file.sha256, r.strength, r.experts, r.ignore_absent_image_attention) for r in requests] == [
        (first.sha256, 0.9, ("high_noise",), True), (job.loras[1].sha256, -0.4, ("high_noise", "low_noise"), True)]
    assert set(applies.one[0][2]) == {"high_noise", "low_noise"}  # a method per expert
    assert solver.one[0] == ("euler", 4, 4.0, (1000, 750, 500, 250))
    assert switch.one[1] == {"boundary": 0.9, "guide_scale": (1.0, 1.0)}

    # 3. the worker's done stats and the outbox's sidecar describe each LoRA as it ran
    run = protocol.Run(job=row.id, kind="i2v", params=received, inputs=record["inputs"], output="/o.mp4")
    stats = done_message(run, result, JobReport(row.id, None), [(None, 0)], ranks, family, False, 0.0).stats
    document = sidecar(row, stats, {}, checkpoints["i2v"])
    assert [(d["file"], d["sha256"], d["strength"], d["experts"], d["format"]) for d in document["loras"]] == [
        ("high.safetensors", first.sha256, 0.9, ["high_noise"], "original"),
        ("style.safetensors", job.loras[1].sha256, -0.4, ["high_noise", "low_noise"], "kohya")]
    assert all(set(d["method"]) == set(d["experts"]) for d in document["loras"])
    assert Job.from_dict(document["parameters"]) == job and "lora_switch_seconds" in document
