"""The mp4 written while the VAE decodes (pipeline.video.Mp4Writer, VideoOutput): the same file as one write of
all frames, errors named and nothing partial left, and the I2V family and the worker streaming a real job.

Real libx264/FFmpeg files (PyAV), decoded to compare; the family runs the tiny checkpoint on the CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from daemon import protocol
from daemon.preprocessing import PrepSettings, prepare_job
from inbox_schema import file_sha256, parse_manifest_text
from pipeline.video import Mp4Writer, VideoError, VideoOutput, frames_to_uint8, read_mp4, write_mp4
from tests import test_job_contract as contract
from tests.test_job_contract import I2V, Report, family_args
from tests.test_worker_pool import IMAGE, MAX_AREA
from tests.test_worker_video import smooth_frames
from tests.workers.harness import write_image

ranks, checkpoints = contract.ranks, contract.checkpoints  # the fixtures: this process as a pool, tiny checkpoints


def chunks_of(frames: torch.Tensor) -> list[torch.Tensor]:
    """As the VAE makes them: the first frame alone, then four at a time."""
    return [frames[:, :1]] + [frames[:, i : i + 4] for i in range(1, frames.shape[1], 4)]


def test_frames_added_chunk_by_chunk_encode_the_frames_of_one_write(tmp_path: Path) -> None:
    """At crf 0 libx264 is lossless in yuv420p, so equal decoded frames mean equal encoded frames. (Its threads
    make the lossy bytes vary now and then with timing, streamed or not: tests/test_resume_pool.py.)"""
    frames = smooth_frames(21, 48, 64, seed=5)
    with Mp4Writer(tmp_path / "streamed.mp4", fps=16, crf=0) as writer:
        for chunk in chunks_of(frames):
            writer.add(chunk)
    assert writer.frames == 21
    decoded, fps = read_mp4(tmp_path / "streamed.mp4")
    whole = write_mp4(frames, tmp_path / "whole.mp4", fps=16, crf=0)
    assert np.array_equal(read_mp4(whole)[0], decoded) and fps == 16
    assert np.abs(decoded.astype(int) - frames_to_uint8(frames)).mean() < 4  # the frames, yuv420p (see test_worker_video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.mp4", "whole.mp4"]  # no partial left


def test_the_encoder_works_before_the_last_frame_arrives(tmp_path: Path) -> None:
    """The point of streaming: packets reach the file while the producer still makes frames."""
    noisy = torch.rand(3, 80, 128, 128) * 2 - 1  # incompressible: every encoded frame adds kilobytes
    writer = Mp4Writer(tmp_path / "out.mp4", fps=16)
    for chunk in chunks_of(noisy):
        writer.add(chunk)
    deadline = time.monotonic() + 60
    while writer.partial.stat().st_size < 200_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    grown = writer.partial.stat().st_size
    assert not writer.path.exists(), "published before close"
    writer.close()
    assert grown >= 200_000, f"only {grown} bytes were encoded before close(): the encoder waited for the end"
    assert read_mp4(writer.path)[0].shape == (80, 128, 128, 3)


def test_a_chunk_of_another_size_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="got 32x32, expected 64x48"), Mp4Writer(tmp_path / "o.mp4", fps=16) as w:
        w.add(smooth_frames(1, 48, 64))
        w.add(smooth_frames(4, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_failure_reaches_the_caller_without_blocking_it(tmp_path: Path) -> None:
    """The encoder thread cannot open its file: adding more chunks than the backlog never hangs, the error
    (FFmpeg's own, so that the worker can classify it) comes out of add or close, and nothing is published."""
    writer = Mp4Writer(tmp_path / "missing" / "out.mp4", fps=16, backlog=2)
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            for _ in range(10):
                writer.add(smooth_frames(4, 16, 16))
            writer.close()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=30)
    assert not producer.is_alive(), "add() blocked on a dead encoder"
    assert len(raised) == 1 and isinstance(raised[0], FileNotFoundError), raised
    writer.abort()
    assert not (tmp_path / "missing").exists()


def test_a_video_output_left_by_an_exception_removes_its_partial_file(tmp_path: Path) -> None:
    out = VideoOutput(tmp_path / "job.mp4")
    writer = out.open(16.0)
    writer.add(smooth_frames(5, 32, 32))
    assert writer.partial.exists() or writer.frames == 5
    out.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoError, match="opened twice"):
        out.open(16.0)


def test_a_video_output_nothing_streamed_into_writes_the_whole_video(tmp_path: Path) -> None:
    frames = smooth_frames(9, 32, 48)
    published = VideoOutput(tmp_path / "job.mp4", crf=0).finish(frames, 16.0)
    once = write_mp4(frames, tmp_path / "once.mp4", fps=16, crf=0)
    assert published == tmp_path / "job.mp4" and np.array_equal(read_mp4(published)[0], read_mp4(once)[0])


# --- the I2V family and the worker, on the tiny checkpoint --------------------------------------------------


class Progress:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        self.seen.append((phase, step, total))


def tiny_job(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    image = write_image(tmp_path / "inbox" / "media" / "kite.png")
    image.write_bytes(IMAGE.read_bytes())
    job = parse_manifest_text(I2V.replace("SHA", file_sha256(image)), "walk.toml", tmp_path / "inbox")
    return job, prepare_job(job, str(tmp_path), PrepSettings())["inputs"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_i2v_family_streams_the_video_it_would_return_whole(tmp_path: Path, ranks: Any,
                                                                 checkpoints: dict[str, Path]) -> None:
    from pipeline.families.i2v import I2VFamily

    job, inputs = tiny_job(tmp_path)
    family = I2VFamily(family_args("i2v-A14B", checkpoints["i2v"], "--max-area", str(MAX_AREA)), ranks)
    family.load()
    whole = family.run(job, inputs, Report(), lambda: False)
    out, progress = VideoOutput(tmp_path / "streamed.mp4", crf=0), Progress()  # lossless: frames compare exactly
    streamed = family.run(job, inputs, progress, lambda: False, video_out=out)
    assert streamed["video"] is None and out.writer is not None and out.writer.frames == 9
    out.finish(streamed["video"], streamed["fps"])
    once = write_mp4(whole["video"], tmp_path / "whole.mp4", fps=whole["fps"], crf=0)
    assert np.array_equal(read_mp4(tmp_path / "streamed.mp4")[0], read_mp4(once)[0])
    decode = [p for p in progress.seen if p[0] == "decode"]
    assert decode == [("decode", i, 3) for i in range(4)], decode  # 9 frames = 3 latent frames, one report each


class CountingOutput(VideoOutput):
    """A VideoOutput that also records how many frames each add() handed over."""

    def __init__(self, path: Path, crf: int) -> None:
        super().__init__(path, crf)
        self.added: list[int] = []

    def open(self, fps: float) -> Mp4Writer:
        writer = super().open(fps)
        add = writer.add

        def counted(frames: torch.Tensor) -> None:
            self.added.append(int(frames.shape[1]))
            add(frames)

        writer.add = counted  # type: ignore[method-assign]
        return writer


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_animate_family_streams_each_clip_and_cuts_the_last(tmp_path: Path, ranks: Any,
                                                                checkpoints: dict[str, Path]) -> None:
    """15 driving frames in clips of 9 that carry 5 over: 9 + 4 + 4 sampled, the last clip cut to 2 new frames;
    the streamed video is the one returned whole, and the writer saw the clips' new frames in order."""
    from pipeline.families.animate import AnimateFamily
    from tests.test_job_contract import ANIMATE
    from tests.test_worker_animate import write_src

    job = parse_manifest_text(ANIMATE, "walk.toml", tmp_path / "inbox", check_inputs=False)
    inputs = write_src(tmp_path / "animate", frames=15)
    family = AnimateFamily(family_args("animate-14B", checkpoints["animate"]), ranks)
    family.load()
    whole = family.run(job, inputs, Report(), lambda: False)
    assert whole["video"].shape[1] == whole["frames"] == 15

    out = CountingOutput(tmp_path / "streamed.mp4", crf=0)
    streamed = family.run(job, inputs, Report(), lambda: False, video_out=out)
    out.finish(streamed["video"], streamed["fps"])
    assert streamed["video"] is None and out.added == [9, 4, 2]
    assert (streamed["frames"], streamed["width"], streamed["height"]) == (15, whole["width"], whole["height"])
    once = write_mp4(whole["video"], tmp_path / "whole.mp4", fps=whole["fps"], crf=0)
    assert np.array_equal(read_mp4(tmp_path / "streamed.mp4")[0], read_mp4(once)[0])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_worker_leaves_no_mp4_when_the_streamed_frames_are_not_finite(tmp_path: Path, ranks: Any,
                                                                          checkpoints: dict[str, Path]) -> None:
    """A VAE that makes Inf: the job fails as numerics at the first chunk, and the worker removes the mp4 it
    had begun (no partial file, nothing at the output path)."""
    from pipeline.families.i2v import I2VFamily
    from pipeline.worker import JobReport, Link, attempt

    class QuietLink(Link):  # no supervisor in this test: nobody cancels
        def cancel_requested(self, job: str) -> bool:
            return False

    job, inputs = tiny_job(tmp_path)
    args = family_args("i2v-A14B", checkpoints["i2v"], "--max-area", str(MAX_AREA))
    family = I2VFamily(args, ranks)
    family.load()
    with torch.no_grad():
        family.models.vae.model.conv2.bias.fill_(float("inf"))  # the decoder's input conv: every frame is Inf
    output = tmp_path / "out" / "job.mp4"
    output.parent.mkdir()
    link = QuietLink(ranks, None)
    run = protocol.Run(job="j1", kind="i2v", inputs=inputs, output=str(output), params=job)
    failure, _ = attempt(family, run, ranks, JobReport("j1", link), link, args)
    assert failure is not None and failure.kind == "numerics" and "decoded frames" in failure.message, failure
    assert list(output.parent.iterdir()) == []


@pytest.mark.gpu
def test_the_uint8_mapping_on_a_gpu_is_the_cpus_bit_for_bit(tmp_path: Path) -> None:
    """The streamed frames are mapped where the VAE left them: on CUDA the same clamp/shift/scale/truncate must
    give the same bytes as on the CPU, including the values right at the truncation boundaries."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(3, 9, 64, 96, generator=g) * 2.4 - 1.2  # some out of range, to be clamped
    edges = (torch.arange(256, dtype=torch.float32) / 255 * 2 - 1).repeat(3, 1, 1, 1)  # k/255 mapped back
    for x in (frames, edges, edges.nextafter(torch.tensor(2.0)), edges.nextafter(torch.tensor(-2.0))):
        assert np.array_equal(frames_to_uint8(x.cuda()), frames_to_uint8(x))
    with Mp4Writer(tmp_path / "gpu.mp4", fps=16, crf=0) as writer:
        for chunk in chunks_of(frames.cuda()):
            writer.add(chunk)
    assert np.array_equal(read_mp4(tmp_path / "gpu.mp4")[0], read_mp4(write_mp4(frames, tmp_path / "cpu.mp4", 16,
                                                                                crf=0))[0])
