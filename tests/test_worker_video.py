"""Tests of pipeline/video.py: the reference's value mapping, and real mp4 files checked by decoding.

No mocks: every mp4 here is encoded by libx264 and decoded again by FFmpeg (PyAV).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.video import VideoError, frames_to_uint8, probe, read_mp4, write_mp4


def smooth_frames(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A moving colour gradient in [-1, 1]: compressible like real video, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, 1, 1, 1, generator=g) * 6.28
    t = torch.arange(frames).view(1, frames, 1, 1) * 0.3
    y = torch.linspace(0, 3, height).view(1, 1, height, 1)
    x = torch.linspace(0, 3, width).view(1, 1, 1, width)
    return torch.sin(phase + t + y + x * torch.tensor([1.0, 0.5, -0.7]).view(3, 1, 1, 1)) * 0.9


def test_value_mapping_is_clamp_shift_scale_truncate() -> None:
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, -0.5, 0.0039])
    frames = values.view(1, 1, 1, -1).expand(3, 1, 1, -1)
    got = frames_to_uint8(frames)[0, 0, :, 0]
    # 0.0 -> 127.5 truncates to 127; 0.999 -> 254.87 -> 254; out-of-range values clamp first
    assert got.tolist() == [0, 0, 127, 254, 255, 255, 63, 127]
    assert got.dtype == np.uint8


def test_numpy_and_torch_inputs_map_identically() -> None:
    frames = smooth_frames(2, 8, 10)
    assert np.array_equal(frames_to_uint8(frames), frames_to_uint8(frames.numpy()))
    assert frames_to_uint8(frames).shape == (2, 8, 10, 3)


@pytest.mark.parametrize(("count", "height", "width", "fps"), [(9, 48, 64, 16.0), (5, 30, 42, 30.0)])
def test_write_then_decode_round_trip(tmp_path, count, height, width, fps) -> None:
    frames = smooth_frames(count, height, width, seed=count)
    path = write_mp4(frames, tmp_path / "out.mp4", fps=fps)
    assert probe(path) == (count, width, height, fps)
    decoded, decoded_fps = read_mp4(path)
    expected = frames_to_uint8(frames).astype(np.int16)
    error = np.abs(decoded.astype(np.int16) - expected)
    assert decoded.shape == expected.shape and decoded_fps == fps
    assert error.mean() < 4.0, f"mean abs pixel error {error.mean():.2f} at crf 10 (yuv420p)"
    assert not list(tmp_path.glob(".*partial")), "the partial file must be renamed away"


def test_faststart_puts_the_index_before_the_media(tmp_path) -> None:
    data = write_mp4(smooth_frames(3, 16, 16), tmp_path / "a.mp4", fps=16).read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "moov atom must come first (+faststart)"


def test_crf_changes_quality(tmp_path) -> None:
    frames = smooth_frames(5, 64, 64, seed=3) + 0.05 * torch.randn(3, 5, 64, 64)
    fine = write_mp4(frames, tmp_path / "fine.mp4", fps=16, crf=0)
    coarse = write_mp4(frames, tmp_path / "coarse.mp4", fps=16, crf=40)
    expected = frames_to_uint8(frames).astype(np.int16)
    err_fine = np.abs(read_mp4(fine)[0].astype(np.int16) - expected).mean()
    err_coarse = np.abs(read_mp4(coarse)[0].astype(np.int16) - expected).mean()
    assert err_fine < err_coarse
    assert fine.stat().st_size > coarse.stat().st_size


@pytest.mark.parametrize(
    ("frames", "fps", "crf", "needle"),
    [
        (torch.zeros(3, 2, 15, 16), 16, 10, "15"),  # odd height
        (torch.zeros(2, 2, 16, 16), 16, 10, "[3, F, H, W]"),
        (torch.zeros(3, 2, 16, 16), 0, 10, "fps"),
        (torch.zeros(3, 2, 16, 16), 16, 99, "crf"),
    ],
)
def test_bad_frames_name_the_problem(tmp_path, frames, fps, crf, needle) -> None:
    with pytest.raises(VideoError, match=needle.replace("[", r"\[")):
        write_mp4(frames, tmp_path / "bad.mp4", fps=fps, crf=crf)
    assert not (tmp_path / "bad.mp4").exists()


def test_probe_rejects_a_file_that_is_not_video(tmp_path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="junk.mp4"):
        probe(junk)
