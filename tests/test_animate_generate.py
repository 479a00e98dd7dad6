"""The Animate generation loop (pipeline/animate.py) on a tiny random checkpoint and real mp4/png src files.

Every run is a real run: tiny.py's checkpoint loaded by AnimateModels.load, src files written and decoded with
PyAV; a spy only records what the DiT receives (it still runs the real DiT). Expected values are computed here
independently (index arithmetic written out), never by calling the code under test.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pipeline.animate import (
    AnimateModels,
    AnimateParameterError,
    check_sequence_parallel,
    encode_prompts,
    generate_animate,
)
from pipeline.animate_sources import AnimateInputError, letterbox, padded_length, ping_pong
from pipeline.i2v import GenerationCancelled
from pipeline.models.animate_dit import lora_targets, merge_lora
from pipeline.video import read_mp4, write_mp4
from pipeline.weights.loader import load_lora_state
from pipeline.weights.tiny import write_animate
from tests.sp_fake import run_ranks

H, W, FACE = 16, 32, 32  # pose/bg/mask frame size; tiny motion encoder takes 32x32 faces
STEPS = 2


# ---------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_animate(tmp_path_factory.mktemp("animate_ckpt"), seed=3)


@pytest.fixture(scope="module")
def models(ckpt: Path) -> AnimateModels:
    return AnimateModels.load(ckpt, relighting_lora=True)


def write_src(folder: Path, frames: int, seed: int = 0, face_size: int = FACE) -> Path:
    """Valid preprocessing output: noise pose/face/bg, a moving box mask, a reference of another aspect."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def noise(n: int, h: int, w: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(-1, 1, (3, n, h, w))).float()

    write_mp4(noise(frames, H, W), folder / "src_pose.mp4", 30)
    write_mp4(noise(frames, face_size, face_size), folder / "src_face.mp4", 30)
    write_mp4(noise(frames, H, W), folder / "src_bg.mp4", 30)
    mask = -torch.ones(3, frames, H, W)
    for i in range(frames):
        mask[:, i, 2:14, 2 + i : 18 + i] = 1  # the character moves right by a pixel per frame
    write_mp4(mask, folder / "src_mask.mp4", 30)
    cv2.imwrite(str(folder / "src_ref.png"), rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    return folder


class DiTSpy:
    """Stands in for models.dit: records every call's inputs, then runs the real DiT."""

    def __init__(self, dit: Any) -> None:
        self.dit, self.config, self.calls = dit, dit.config, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, seq_len: int, y: torch.Tensor,
                 **kw: Any) -> torch.Tensor:
        self.calls.append({"x": x.clone(), "t": int(t), "context": context, "seq_len": seq_len, "y": y.clone(),
                           **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}})
        return self.dit(x, t, context, seq_len, y, **kw)


def spied(models: AnimateModels) -> tuple[AnimateModels, DiTSpy]:
    """The models with the DiT spied on; without the relighting LoRA (its hooks need the real module tree)."""
    spy = DiTSpy(models.dit)
    return dataclasses.replace(models, dit=spy, relighting=None), spy


@dataclasses.dataclass
class Run:
    video: torch.Tensor
    calls: list[dict]
    progress: list[tuple]
    src: Path


def run(models: AnimateModels, src: Path, **kw: Any) -> Run:
    m, spy = spied(models)
    progress: list[tuple] = []
    args = dict(mode="animation", clip_len=5, refert_num=1, steps=STEPS, seed=7) | kw
    video = generate_animate(m, src, on_progress=lambda *a: progress.append(a), **args)
    return Run(video, spy.calls, progress, src)


@pytest.fixture(scope="module")
def animation5(models: AnimateModels, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Animation, refert 5, clip_len 9, 15 frames -> padded to 17 -> three clips starting at 0, 4 and 8.
    Each later clip adds only 4 new frames, fewer than the 5 it carries over."""
    src = write_src(tmp_path_factory.mktemp("anim5"), 15, seed=1)
    return run(models, src, mode="animation", clip_len=9, refert_num=5)


@pytest.fixture(scope="module")
def replacement1(models: AnimateModels, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Replacement, refert 1, clip_len 5, 7 frames -> padded to 9 -> clips at 0 and 4; with guidance."""
    src = write_src(tmp_path_factory.mktemp("repl1"), 7, seed=2)
    return run(models, src, mode="replacement", clip_len=5, refert_num=1, guide_scale=2.5)


def decoded(path: Path) -> np.ndarray:
    return read_mp4(path)[0]


def pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, h, w, 3] -> [3, N, h, w] in [-1, 1] (float64 arithmetic, then float32)."""
    return torch.from_numpy(frames.astype(np.float64) / 127.5 - 1).float().permute(3, 0, 1, 2)


def clip_calls(r: Run, clip: int) -> list[dict]:
    clips = len([p for p in r.progress if p[0] == "decoding"])
    per_clip = len(r.calls) // clips
    return r.calls[clip * per_clip : (clip + 1) * per_clip]


def expected_mask(pixel_mask: np.ndarray) -> np.ndarray:
    """[F, h, w] -> [4, 1 + (F-1)/4, h, w], written out index by index from WAN_SPEC §8.8."""
    frames, h, w = pixel_mask.shape
    out = np.zeros((4, 1 + (frames - 1) // 4, h, w), dtype=np.float32)
    out[:, 0] = pixel_mask[0]
    for j in range(1, out.shape[1]):
        for c in range(4):
            out[c, j] = pixel_mask[4 * (j - 1) + 1 + c]
    return out


# ---------------------------------------------------------------------------------------------- lengths, sizes


@pytest.mark.parametrize("which", ["animation5", "replacement1"])
def test_multi_clip_runs_give_the_real_length_at_the_pose_size(which: str, request: pytest.FixtureRequest) -> None:
    r: Run = request.getfixturevalue(which)
    frames = decoded(r.src / "src_pose.mp4").shape[0]
    assert r.video.shape == (3, frames, H, W)
    assert r.video.dtype == torch.float32 and r.video.device.type == "cpu"
    assert torch.isfinite(r.video).all() and r.video.abs().max() <= 1
    assert {c["seq_len"] for c in r.calls} == {r.calls[0]["y"].shape[1] * (H // 16) * (W // 16)}


@pytest.mark.parametrize(("mode", "clip_len", "refert", "frames"),
                         [("animation", 5, 1, 6), ("replacement", 9, 5, 10)])
def test_the_other_mode_refert_pairs_also_give_the_real_length(
    models: AnimateModels, tmp_path: Path, mode: str, clip_len: int, refert: int, frames: int
) -> None:
    src = write_src(tmp_path / "src", frames, seed=frames)
    r = run(models, src, mode=mode, clip_len=clip_len, refert_num=refert, steps=1)
    assert r.video.shape == (3, frames, H, W)
    assert len(r.calls) == 2  # two clips, one step each, one forward per step


def test_padding_and_clip_count_follow_the_reference() -> None:
    def reference_valid_len(real: int, clip_len: int, overlap: int) -> int:  # get_valid_len, restated
        rest = (real - overlap) % (clip_len - overlap)
        return real + (0 if rest == 0 else clip_len - overlap - rest)

    for clip_len, refert in [(77, 1), (77, 5), (5, 1), (9, 5), (13, 1)]:
        for real in range(refert + 1, 200):
            assert padded_length(real, clip_len, refert) == reference_valid_len(real, clip_len, refert)
    assert padded_length(3, 9, 5) == 9 and padded_length(1, 5, 1) == 5  # too short: one whole clip


def test_ping_pong_reflects_without_repeating_the_ends() -> None:
    assert ping_pong(3, 9) == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert ping_pong(4, 8) == [0, 1, 2, 3, 2, 1, 0, 1]
    assert ping_pong(2, 5) == [0, 1, 0, 1, 0]
    assert ping_pong(1, 4) == [0, 0, 0, 0]
    assert ping_pong(5, 3) == [0, 1, 2]


def test_reference_is_letterboxed_with_black_bars() -> None:
    image = np.full((30, 20, 3), 200, dtype=np.uint8)  # taller than 16x32: full height, bars left/right
    out = letterbox(image, 16, 32)
    new_w = int(16 / 30 * 20)  # 10
    left = int((32 - new_w) / 2)  # 11
    assert out.shape == (16, 32, 3)
    assert (out[:, :left] == 0).all() and (out[:, left + new_w :] == 0).all()
    assert (out[:, left : left + new_w] == 200).all()
    wide = letterbox(np.full((10, 80, 3), 50, np.uint8), 16, 32)  # wider: full width, bars top/bottom
    assert (wide[:6] == 0).all() and (wide[6:10] == 50).all() and (wide[10:] == 0).all()


# ---------------------------------------------------------------------------------------------- conditioning


def test_reference_frame_of_y_is_the_encoded_letterboxed_image_with_a_ones_mask(
    models: AnimateModels, animation5: Run
) -> None:
    ref = cv2.imread(str(animation5.src / "src_ref.png"))[..., ::-1]
    boxed = letterbox(np.ascontiguousarray(ref), H, W)
    latent = models.vae.encode(pixels(boxed[None]))
    for call in animation5.calls:
        assert (call["y"][:4, 0] == 1).all()
        torch.testing.assert_close(call["y"][4:, :1], latent, rtol=0, atol=1e-6)
        assert call["clip_fea"].shape == (1, 257, models.dit.config.clip_dim)


def test_animation_first_clip_has_zero_mask_and_encoded_black_frames(models: AnimateModels, animation5: Run) -> None:
    y = clip_calls(animation5, 0)[0]["y"]
    assert (y[:4, 1:] == 0).all()
    torch.testing.assert_close(y[4:, 1:], models.vae.encode(torch.zeros(3, 9, H, W)), rtol=0, atol=1e-6)


def test_animation_later_clip_carries_the_decoded_tail_of_the_previous_clip(
    models: AnimateModels, animation5: Run
) -> None:
    pixel_mask = np.zeros((9, H // 8, W // 8), np.float32)
    pixel_mask[:5] = 1
    mask = torch.from_numpy(expected_mask(pixel_mask))
    for clip, start in ((1, 4), (2, 8)):
        y = clip_calls(animation5, clip)[0]["y"]
        # A later clip starts with the 5 output frames already made at its positions (clip 1's last 5 frames;
        # for clip 3, one of clip 1's and the 4 new frames of clip 2).
        tail = animation5.video[:, start : start + 5]
        video = torch.cat([tail, torch.zeros(3, 4, H, W)], dim=1)
        torch.testing.assert_close(y[4:, 1:], models.vae.encode(video), rtol=0, atol=1e-6)
        assert torch.equal(y[:4, 1:], mask)
        assert (y[:4, 1:3] == 1).all() and (y[:4, 3:] == 0).all()  # refert 5: latent frames 0 and 1 known


def test_replacement_masks_are_one_minus_the_nearest_downsampled_mask(models: AnimateModels, replacement1: Run) -> None:
    mask = decoded(replacement1.src / "src_mask.mp4")[..., 0].astype(np.float64) / 255  # not re-binarised
    background = decoded(replacement1.src / "src_bg.mp4")
    order = [0, 1, 2, 3, 4, 5, 6, 5, 4]  # 7 frames reflected to 9
    for clip, start in enumerate((0, 4)):
        frames = order[start : start + 5]
        keep = 1 - mask[frames, ::8, ::8]  # nearest at an exact /8 picks pixel 8i, 8j
        if clip:
            keep[:1] = 1  # refert 1: the carried frame is known
        y = clip_calls(replacement1, clip)[0]["y"]
        torch.testing.assert_close(y[:4, 1:], torch.from_numpy(expected_mask(keep.astype(np.float32))),
                                   rtol=0, atol=1e-6)
        bg = pixels(background[frames])
        if clip:
            bg[:, :1] = replacement1.video[:, 4:5]  # the last decoded frame of clip 1
        torch.testing.assert_close(y[4:, 1:], models.vae.encode(bg), rtol=0, atol=1e-6)


def test_pose_and_face_of_each_clip_are_the_clips_frames(models: AnimateModels, animation5: Run) -> None:
    pose = decoded(animation5.src / "src_pose.mp4")
    face = decoded(animation5.src / "src_face.mp4")
    order = [*range(15), 13, 12]  # 15 frames reflected to 17
    for clip, start in enumerate((0, 4, 8)):
        call = clip_calls(animation5, clip)[0]
        frames = order[start : start + 9]
        torch.testing.assert_close(call["face_pixel_values"], pixels(face[frames])[None], rtol=0, atol=1e-6)
        torch.testing.assert_close(call["pose_latents"], models.vae.encode(pixels(pose[frames])), rtol=0,
                                   atol=1e-6)


# ---------------------------------------------------------------------------------------------- sampling


def test_noise_continues_one_generator_stream_across_clips(animation5: Run) -> None:
    gen = torch.Generator().manual_seed(7)
    shape = clip_calls(animation5, 0)[0]["x"].shape
    for clip in range(3):
        expected = torch.randn(*shape, generator=gen)
        assert torch.equal(clip_calls(animation5, clip)[0]["x"], expected)
    assert [c["t"] for c in animation5.calls] == [999, 833] * 3  # a fresh 2-step UniPC schedule (shift 5) per clip


def test_given_noise_replaces_the_generator_draws(models: AnimateModels, animation5: Run) -> None:
    drawn = [clip_calls(animation5, c)[0]["x"] for c in range(3)]
    args = dict(mode="animation", clip_len=9, refert_num=5, steps=STEPS)
    replay = run(models, animation5.src, seed=999, noise=drawn, **args)  # another seed: the noise decides
    assert torch.equal(replay.video, animation5.video)
    with pytest.raises(AnimateParameterError, match=r"noise: got 2 tensors, expected one per clip \(3 clips\)"):
        generate_animate(models, animation5.src, seed=1, noise=drawn[:2], **args)
    with pytest.raises(AnimateParameterError, match=r"noise\[1\]: got shape \[16, 3, 2, 4\], expected \[16, 4, 2, 4\]"):
        generate_animate(models, animation5.src, seed=1, noise=[drawn[0], drawn[1][:, :3], drawn[2]], **args)


def test_progress_counts_steps_across_clips(animation5: Run) -> None:
    sampling = [p for p in animation5.progress if p[0] == "sampling"]
    assert sampling == [("sampling", k + 1, 6, k // 2) for k in range(6)]
    assert [p for p in animation5.progress if p[0] != "sampling"] == [
        (phase, c + 1, 3, c) for c in range(3) for phase in ("encoding", "decoding")
    ]
    assert animation5.progress.index(("sampling", 3, 6, 1)) > animation5.progress.index(("encoding", 2, 3, 1))


def test_a_three_argument_progress_callback_gets_no_clip_index(models: AnimateModels, tmp_path: Path) -> None:
    seen: list[tuple] = []

    def report(phase: str, step: int, total: int) -> None:  # the I2V pipeline's callback shape
        seen.append((phase, step, total))

    generate_animate(models, write_src(tmp_path / "src", 2), mode="animation", clip_len=5, steps=2, seed=1,
                     on_progress=report)
    assert [s for s in seen if s[0] == "sampling"] == [("sampling", 1, 2), ("sampling", 2, 2)]


def test_guidance_runs_a_second_forward_with_a_black_face_and_the_negative_prompt(
    models: AnimateModels, replacement1: Run
) -> None:
    calls = replacement1.calls
    assert len(calls) == 2 * STEPS * 2  # clips x steps x (cond, uncond)
    context, context_null = encode_prompts(models, None, None)
    for cond, uncond in zip(calls[0::2], calls[1::2], strict=True):
        assert torch.equal(cond["x"], uncond["x"]) and cond["t"] == uncond["t"]
        assert (uncond["face_pixel_values"] == -1).all()
        assert not (cond["face_pixel_values"] == -1).all()
        torch.testing.assert_close(cond["context"], context)
        torch.testing.assert_close(uncond["context"], context_null)
        assert torch.equal(cond["y"], uncond["y"]) and torch.equal(cond["pose_latents"], uncond["pose_latents"])


def test_prompt_embeddings_pass_through_unchanged(models: AnimateModels, replacement1: Run) -> None:
    """A pool encodes the prompts once on rank 0 and hands every rank the embeddings."""
    context, context_null = encode_prompts(models, "a dancer", "")
    assert torch.equal(encode_prompts(models, context, context_null)[0], context)
    assert torch.equal(encode_prompts(models, context, None)[1], encode_prompts(models, None, None)[1])
    assert not torch.equal(context, encode_prompts(models, None, None)[0])  # None is the fixed Animate prompt
    m, spy = spied(models)
    generate_animate(m, replacement1.src, mode="replacement", clip_len=5, steps=1, seed=1, guide_scale=2.0,
                     prompt=context, negative_prompt=context_null)
    assert torch.equal(spy.calls[0]["context"], context) and torch.equal(spy.calls[1]["context"], context_null)
    with pytest.raises(AnimateParameterError, match=r"prompt: got an embedding of shape \[1, "):
        encode_prompts(models, context[None], None)


def test_guide_scale_one_or_below_is_a_single_forward(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 3)
    assert len(run(models, src, steps=2, guide_scale=1.0).calls) == 2
    assert len(run(models, src, steps=2, guide_scale=0.5).calls) == 2  # the reference guides only when > 1


def test_explicit_euler_timesteps_are_the_ones_sampled_in_every_clip(models: AnimateModels, tmp_path: Path) -> None:
    """A distilled schedule (solver euler + timesteps) reaches the DiT as given, clip after clip (they were once
    dropped on the way and the default schedule ran instead)."""
    from pipeline.sampling import make_solver

    src = write_src(tmp_path / "src", 7)  # two clips of clip_len 5
    given = run(models, src, steps=2, shift=5.0, solver="euler", timesteps=[1000, 250])
    expected = [int(t) for t in make_solver("euler", 2, 5.0, [1000, 250]).timesteps]
    assert [c["t"] for c in given.calls] == expected * 2
    default = run(models, src, steps=2, shift=5.0, solver="euler")
    assert [c["t"] for c in default.calls] != [c["t"] for c in given.calls]


def test_same_seed_same_video_other_seed_other_video(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 4)
    a = run(models, src, steps=1, seed=11).video
    b = run(models, src, steps=1, seed=11).video
    c = run(models, src, steps=1, seed=12).video
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_cancel_stops_at_the_next_step_boundary(models: AnimateModels, animation5: Run) -> None:
    answers = iter([False, False, False, True])
    m, spy = spied(models)
    with pytest.raises(GenerationCancelled, match=r"step 4 of 6 \(clip 2 of 3\)"):
        generate_animate(m, animation5.src, mode="animation", clip_len=9, refert_num=5, steps=STEPS, seed=7,
                         should_cancel=lambda: next(answers))
    assert len(spy.calls) == 3  # three steps ran, the fourth never started


def test_a_video_shorter_than_one_clip_is_reflected_and_trimmed(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 3, seed=5)
    r = run(models, src, clip_len=9, refert_num=5, steps=1)
    assert r.video.shape == (3, 3, H, W) and len(r.calls) == 1
    face = decoded(src / "src_face.mp4")
    torch.testing.assert_close(r.calls[0]["face_pixel_values"], pixels(face[[0, 1, 2, 1, 0, 1, 2, 1, 0]])[None],
                               rtol=0, atol=1e-6)


def test_a_single_frame_video_works(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 1, seed=6)
    r = run(models, src, steps=1)
    assert r.video.shape == (3, 1, H, W)


# ---------------------------------------------------------------------------------------------- parallel, LoRA


def test_sequence_parallel_equals_one_process(models: AnimateModels, animation5: Run) -> None:
    def on_rank(sp: Any) -> torch.Tensor:
        return generate_animate(models, animation5.src, mode="animation", clip_len=9, refert_num=5, steps=STEPS,
                                seed=7, sp=sp, relighting_lora=False)

    for video in run_ranks(2, on_rank):
        torch.testing.assert_close(video, animation5.video, rtol=1e-4, atol=1e-4)


def test_indivisible_token_count_is_refused_up_front(models: AnimateModels, animation5: Run) -> None:
    class ThreeRanks:
        world_size, rank = 3, 0

    m, spy = spied(models)
    # 9-frame clips: 4 latent frames (+1 reference) x 1 x 2 patches = 8 tokens; 3 ranks cannot split them.
    with pytest.raises(AnimateParameterError, match=r"world size 3 must divide both the 8 tokens.*: 1, 2$"):
        generate_animate(m, animation5.src, mode="animation", clip_len=9, refert_num=5, steps=1, seed=1,
                         sp=ThreeRanks())
    assert spy.calls == []


def test_world_sizes_must_split_tokens_and_heads() -> None:
    class Ranks:
        def __init__(self, n: int) -> None:
            self.world_size, self.rank = n, 0

    grid_720p = (21, 45, 80)  # 75,600 tokens, 40 heads
    for n in (1, 2, 4, 5, 8):
        check_sequence_parallel(75_600, grid_720p, Ranks(n), 40)
    with pytest.raises(AnimateParameterError, match=r"world size 3 .* work for this video: 1, 2, 4, 5, 8, 10, 20, 40$"):
        check_sequence_parallel(75_600, grid_720p, Ranks(3), 40)
    with pytest.raises(AnimateParameterError, match=r"world size 4 must divide .* 2 attention heads.*: 1, 2$"):
        check_sequence_parallel(8, (4, 1, 2), Ranks(4), 2)  # the tokens split, the heads do not


def test_relighting_lora_hooks_equal_merged_weights_and_leave_nothing_behind(models: AnimateModels,
                                                                             ckpt: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    cfg = models.dit.config
    inputs = dict(x=torch.randn(16, 3, 2, 4, generator=gen), t=torch.tensor([900]),
                  context=torch.randn(5, cfg.text_dim, generator=gen), seq_len=6,
                  y=torch.randn(20, 3, 2, 4, generator=gen))
    kw = dict(clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=gen),
              pose_latents=torch.randn(16, 2, 2, 4, generator=gen),
              face_pixel_values=torch.rand(1, 3, 5, FACE, FACE, generator=gen) * 2 - 1)
    with torch.no_grad():
        plain = models.dit(*inputs.values(), **kw)
        assert models.relighting is not None
        with models.relighting.applied(models.dit, models.device):
            hooked = models.dit(*inputs.values(), **kw)
        after = models.dit(*inputs.values(), **kw)
        merged_model = copy.deepcopy(models.dit)
        merged_paths = merge_lora(merged_model, load_lora_state(ckpt / "relighting_lora.ckpt"))
        merged = merged_model(*inputs.values(), **kw)
    assert torch.equal(plain, after)  # hooks removed on exit
    assert (hooked - plain).abs().max() > 1e-3
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-4)
    assert sorted(models.relighting.layers) == sorted(merged_paths) == sorted(lora_targets(models.dit))


def test_a_job_asking_for_relighting_changes_the_video_only_for_that_job(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 2)
    args = dict(mode="animation", clip_len=5, steps=1, seed=3)
    before = generate_animate(models, src, relighting_lora=False, **args)
    lit = generate_animate(models, src, relighting_lora=True, **args)
    after = generate_animate(models, src, relighting_lora=False, **args)
    assert torch.equal(before, after)
    assert (lit - before).abs().max() > 1e-3
    assert torch.equal(generate_animate(models, src, **args), lit)  # loaded with it: on unless a job says no
    bare = dataclasses.replace(models, relighting=None)
    assert torch.equal(generate_animate(bare, src, **args), before)
    with pytest.raises(AnimateParameterError, match="relighting_lora"):
        generate_animate(bare, src, mode="animation", seed=1, relighting_lora=True)


def test_relighting_reference_mode_is_the_official_code_not_applied(models: AnimateModels, tmp_path: Path) -> None:
    """relighting_lora="reference": as the official generate.py, whose PEFT load drops every LoRA key."""
    from pipeline.animate import RELIGHTING_REFERENCE, describe_relighting

    src = write_src(tmp_path / "src", 2)
    args = dict(mode="animation", clip_len=5, steps=1, seed=3)
    off = generate_animate(models, src, relighting_lora=False, **args)
    assert torch.equal(generate_animate(models, src, relighting_lora=RELIGHTING_REFERENCE, **args), off)
    bare = dataclasses.replace(models, relighting=None)  # no LoRA loaded: "reference" needs none
    assert torch.equal(generate_animate(bare, src, relighting_lora="reference", **args), off)
    with pytest.raises(AnimateParameterError, match=r"relighting_lora: got 'official'; expected true, false or "
                                                    r"'reference' \(as the official code: not applied\)"):  # fmt: skip
        generate_animate(models, src, relighting_lora="official", **args)
    assert describe_relighting("reference", True).startswith("reference: not applied")
    assert (describe_relighting(None, True), describe_relighting(True, False), describe_relighting(False, True)) == (
        "applied", "off", "off")


def test_relighting_lora_is_read_by_the_lora_package(models: AnimateModels, ckpt: Path) -> None:
    from pipeline.lora import LoraFormat

    assert models.relighting is not None
    bound = models.relighting.bound
    assert bound.file.format is LoraFormat.PEFT and bound.file.name == "relighting_lora.ckpt"
    assert not bound.diffs and len(bound.low_rank) == len(list(lora_targets(models.dit)))
    assert all(c.scale == 1.0 and c.down.device == models.device for c in bound.low_rank)
    assert not bound.file.tensors  # resident as the bound changes only, not twice


def compiled_pool_keeps_both_kinds_of_job_right(models: AnimateModels, src: Path, tolerance: float) -> None:
    """Compile as the pool does with a resident LoRA; both kinds of job match the eager model."""
    from pipeline.models.fast import optimize

    args = dict(mode="animation", clip_len=5, steps=1, seed=3)
    plain, lit = (generate_animate(models, src, relighting_lora=lora, **args) for lora in (False, True))
    optimize(models.dit, compile=True, fuse_qkv=False)  # what the pool does when the LoRA is resident
    for lora, before in ((True, lit), (False, plain)):
        after = generate_animate(models, src, relighting_lora=lora, **args)
        assert ((after - before).float().norm() / before.float().norm()) < tolerance, f"relighting_lora={lora}"
    # the LoRA changes the video by more than the tolerance, so a LoRA job without its hooks would fail above
    assert ((lit - plain).float().norm() / plain.float().norm()) > 1.5 * tolerance


def test_the_pools_compiled_fast_path_keeps_both_kinds_of_job_right(ckpt: Path, tmp_path: Path) -> None:
    """The warm pool compiles the blocks; a LoRA job runs them eagerly with its hooks, a plain job compiled."""
    from pipeline.models.fast import optimize

    models = AnimateModels.load(ckpt, relighting_lora=True)
    src = write_src(tmp_path / "src", 2)
    args = dict(mode="animation", clip_len=5, steps=1, seed=3)
    compiled_pool_keeps_both_kinds_of_job_right(models, src, tolerance=1e-5)
    optimize(models.dit, compile=False, fuse_qkv=True)  # fused q/k/v would skip their LoRA: refused, not wrong
    with pytest.raises(RuntimeError, match="fuse_qkv=False"):
        generate_animate(models, src, relighting_lora=True, **args)
    assert torch.equal(generate_animate(models, src, relighting_lora=False, **args),
                       generate_animate(models, src, relighting_lora=False, **args))  # fmt: skip


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_parameters_name_the_field(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "src", 2)
    cases = [(dict(mode="replace"), "mode"), (dict(refert_num=3), "refert_num"), (dict(clip_len=6), "clip_len"),
             (dict(clip_len=5, refert_num=5), "clip_len"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"), (dict(guide_scale=0), "guide")]
    for change, field in cases:
        args = dict(mode="animation", seed=1, clip_len=5) | change
        with pytest.raises(AnimateParameterError, match=field):
            generate_animate(models, src, **args)


def test_bad_src_files_name_the_file(models: AnimateModels, tmp_path: Path) -> None:
    src = write_src(tmp_path / "wrong_face", 3, face_size=64)
    with pytest.raises(AnimateInputError, match=r"src_face.mp4: frames are 64x64, expected 32x32"):
        generate_animate(models, src, mode="animation", seed=1, clip_len=5)
    src = write_src(tmp_path / "no_mask", 3)
    (src / "src_mask.mp4").unlink()
    generate_animate(models, src, mode="animation", seed=1, clip_len=5, steps=1)  # animation needs no mask
    with pytest.raises(AnimateInputError, match=r"src_mask.mp4: missing"):
        generate_animate(models, src, mode="replacement", seed=1, clip_len=5)
    short = write_src(tmp_path / "short_bg", 2)
    write_src(tmp_path / "long", 3)
    (tmp_path / "long" / "src_bg.mp4").replace(short / "src_bg.mp4")
    with pytest.raises(AnimateInputError, match=r"src_bg.mp4: 3 frames, expected 2"):
        generate_animate(models, short, mode="replacement", seed=1, clip_len=5)
    odd = tmp_path / "odd"
    odd.mkdir()
    write_mp4(torch.zeros(3, 2, 24, 32), odd / "src_pose.mp4", 30)
    with pytest.raises(AnimateInputError, match=r"src_pose.mp4: frames are 32x24, expected .* multiples of 16"):
        generate_animate(models, odd, mode="animation", seed=1, clip_len=5)


# ---------------------------------------------------------------------------------------------- GPU, bench


@pytest.mark.gpu
def test_bf16_on_cuda_runs_the_reference_dtypes(ckpt: Path, tmp_path: Path) -> None:
    """bf16 DiT under autocast, bf16 pixels and y, fp16 CLIP, fp32 VAE: the reference's GPU set-up."""
    models = AnimateModels.load(ckpt, "cuda", torch.bfloat16, relighting_lora=True)
    assert models.clip.dtype == torch.float16 and models.vae.dtype == torch.float32
    src = write_src(tmp_path / "src", 7, seed=9)
    m, spy = spied(models)
    args = dict(mode="replacement", clip_len=5, refert_num=1, steps=2, seed=4, guide_scale=2.0)
    video = generate_animate(m, src, **args)
    assert video.shape == (3, 7, H, W) and torch.isfinite(video).all()
    assert spy.calls[0]["y"].dtype == torch.bfloat16 and spy.calls[0]["face_pixel_values"].dtype == torch.bfloat16
    assert torch.equal(generate_animate(models, src, relighting_lora=False, **args), video)
    lit = generate_animate(models, src, relighting_lora=True, **args)
    assert torch.isfinite(lit).all() and not torch.equal(lit, video)


@pytest.mark.gpu
def test_compiled_pool_on_cuda_in_bf16(ckpt: Path, tmp_path: Path) -> None:
    models = AnimateModels.load(ckpt, "cuda", torch.bfloat16, relighting_lora=True)
    compiled_pool_keeps_both_kinds_of_job_right(models, write_src(tmp_path / "src", 2), tolerance=1e-2)


def test_bench_tiny_step_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_animate_step.py"
    spec = importlib.util.spec_from_file_location("bench_animate_step", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--iters", "1", "--warmup", "0", "--guide-scale", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    step = lines[-1]
    assert step["bench"] == "animate_step" and step["finite"] and step["forwards_per_step"] == 2
    assert step["latent"] == [16, 4, 4, 8] and step["face"] == [1, 3, 9, 32, 32] and step["tokens"] == 32


def test_run_cli_writes_the_mp4(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pipeline.animate_run import main
    from pipeline.video import probe

    src = write_src(tmp_path / "src", 6, seed=8)
    out = tmp_path / "out.mp4"
    args = [str(ckpt), str(src), str(out), "--mode", "replacement", "--clip-len", "5", "--steps", "1",
            "--device", "cpu", "--relighting-lora"]
    assert main(args) == 0
    assert probe(out) == (6, W, H, 30.0)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["frames"] == 6
    (src / "src_bg.mp4").unlink()
    assert main(args) == 2
    assert "src_bg.mp4: missing" in capsys.readouterr().err
