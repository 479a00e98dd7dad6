"""I2V input preparation and the I2V pipeline function, checked against the reference pipeline fixture.

Uses real files (the shared photo, generated JPEG/PNG files, the tiny reference checkpoints); no fakes.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocess.image import ImageInputError, latent_size, load_image, output_size, prepare_image

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- image preparation (CPU pool, no torch)


def test_output_size_follows_the_reference_floor_chain() -> None:
    assert output_size(60, 45, 3500) == (64, 48)  # the pipeline fixture's image and area
    assert output_size(1280, 720, 1280 * 720) == (1280, 720)
    assert output_size(720, 1280, 1280 * 720) == (720, 1280)
    assert output_size(832, 1104, 480 * 832) == (544, 720)  # the Wan example photo at 480p
    assert latent_size(832, 1104, 480 * 832) == (90, 68)


@pytest.mark.parametrize("seed", range(5))
def test_output_size_is_even_latent_within_area_for_any_aspect(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(50, 5000, size=2))
        area = int(rng.integers(16 * 16 * 4 * max(w / h, h / w), 1_000_000))
        out_w, out_h = output_size(w, h, area)
        assert out_w % 16 == 0 and out_h % 16 == 0 and out_w * out_h <= area, (w, h, area)
        # floor(floor(x / 8) / 2) * 2 == the largest even multiple of 8 not above x
        assert out_h == 16 * int(np.sqrt(area * h / w) // 16)


def test_too_small_area_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ImageInputError, match="max_area"):
        output_size(1000, 100, 2000)
    with pytest.raises(ImageInputError, match="max_area"):
        output_size(100, 100, 0)


def test_prepare_image_writes_an_rgb_png_of_the_upright_image(media: Path, tmp_path: Path) -> None:
    info = prepare_image(media / "i2v_input.jpg", tmp_path / "prep" / "image.png", 480 * 832)
    assert (info["width"], info["height"]) == (544, 720)
    assert (info["image_width"], info["image_height"]) == (832, 1104)
    assert info["orientation_applied"] is False
    with Image.open(tmp_path / "prep" / "image.png") as out:
        assert out.format == "PNG" and out.mode == "RGB" and out.size == (832, 1104)
        with Image.open(media / "i2v_input.jpg") as src:
            assert np.array_equal(np.asarray(out), np.asarray(src.convert("RGB")))
    assert not list((tmp_path / "prep").glob(".*partial"))


def test_exif_orientation_is_applied_and_recorded(tmp_path: Path) -> None:
    pixels = np.zeros((40, 100, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    info = prepare_image(tmp_path / "rotated.jpg", tmp_path / "out.png", 100 * 40)
    assert info["exif_orientation"] == 6 and info["orientation_applied"] is True
    assert (info["source_width"], info["source_height"]) == (100, 40)
    assert (info["image_width"], info["image_height"]) == (40, 100)
    upright = np.asarray(Image.open(tmp_path / "out.png"))
    assert upright.shape == (100, 40, 3)
    assert upright[:10].mean() > 200 and upright[-40:].mean() < 30  # the band is now on top
    _, again = load_image(tmp_path / "out.png")  # the worker must not rotate the prepared image twice
    assert again["exif_orientation"] == 1 and again["orientation_applied"] is False


def test_alpha_and_palette_images_become_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (64, 48), (10, 200, 30, 128)).save(tmp_path / "a.png")
    Image.new("P", (64, 48), 3).save(tmp_path / "p.png")
    for name in ("a.png", "p.png"):
        prepare_image(tmp_path / name, tmp_path / f"out_{name}", 64 * 48)
        assert Image.open(tmp_path / f"out_{name}").mode == "RGB"


def test_undecodable_and_missing_files_are_rejected_with_the_file_named(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (1, 2, 3)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("cut.jpg", "text.jpg"):
        with pytest.raises(ImageInputError, match=f"{name}: cannot be decoded"):
            prepare_image(tmp_path / name, tmp_path / "out.png", 10000)
    with pytest.raises(ImageInputError, match="missing.png: not found"):
        prepare_image(tmp_path / "missing.png", tmp_path / "out.png", 10000)
    assert not (tmp_path / "out.png").exists()


def test_image_preparation_does_not_import_torch() -> None:
    code = "import sys, pipeline.preprocess.image; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ---------------------------------------------------------------- the pipeline against the reference run


@pytest.fixture(scope="module")
def reference_run(wan_ref: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    folder = wan_ref / "pipeline_i2v"
    return json.loads((folder / "cases.json").read_text()), load_file(str(folder / "cases.safetensors"))


@pytest.fixture(scope="module")
def fixture_models(wan_ref: Path) -> Any:
    import torch

    from pipeline.i2v import I2VModels
    from pipeline.models.vae import WanVAE
    from pipeline.weights.loader import load_i2v_experts

    high, low = load_i2v_experts(wan_ref / "dit_i2v")
    vae = WanVAE.from_checkpoint(wan_ref / "vae" / "Wan2.1_VAE.pth")
    return I2VModels(high, low, vae, None, torch.device("cpu"), torch.float32)


def _rel(actual: Any, expected: Any) -> float:
    return float((actual - expected).norm() / expected.norm())


class _Recorder:
    """Sequential guidance that keeps what each step saw and produced."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def __call__(self, model: Any, latent: Any, t: Any, cond_kwargs: dict, uncond_kwargs: dict, scale: float) -> Any:
        from pipeline.sampling.guidance import mix

        cond, uncond = model(latent, t, **cond_kwargs), model(latent, t, **uncond_kwargs)
        velocity = mix(cond, uncond, scale)
        self.steps.append(
            {
                "latent_in": latent,
                "cond": cond,
                "uncond": uncond,
                "velocity": velocity,
                "t": int(t),
                "scale": scale,
            }
        )
        return velocity


def _fixture_call(reference_run: tuple[dict, dict], wan_ref: Path) -> dict:
    cases, tensors = reference_run
    call = cases["call"]
    return dict(
        image=Image.open(wan_ref / "pipeline_i2v" / "image.png").convert("RGB"),
        prompt=tensors["context"],
        negative_prompt=tensors["context_null"],
        max_area=call["max_area"],
        frames=call["frame_num"],
        steps=call["sampling_steps"],
        shift=call["shift"],
        guide_scale=call["guide_scale"],
        solver=call["sample_solver"],
        seed=call["seed"],
        noise=tensors["noise"],
        boundary=cases["derived"]["boundary_timestep"] / cases["derived"]["num_train_timesteps"],
    )


def test_generate_i2v_reproduces_the_reference_run_step_by_step(
    reference_run: tuple, fixture_models: Any, wan_ref: Path
) -> None:
    from pipeline.i2v import generate_i2v

    cases, tensors = reference_run
    tol = cases["tolerance"]
    recorder = _Recorder()
    args = _fixture_call(reference_run, wan_ref)
    image, prompt, negative = args.pop("image"), args.pop("prompt"), args.pop("negative_prompt")
    video = generate_i2v(fixture_models, image, prompt, negative, guidance=recorder, **args)
    assert len(recorder.steps) == len(cases["steps"])
    for i, (step, plan) in enumerate(zip(recorder.steps, cases["steps"], strict=True)):
        assert (step["t"], step["scale"]) == (plan["t"], plan["guide_scale"])
        for name in ("latent_in", "cond", "uncond", "velocity"):
            assert _rel(step[name], tensors[f"step{i}.{name}"]) <= tol["per_step_rel_l2"], (i, name)
        if i + 1 < len(recorder.steps):  # the next step's input is this step's output
            assert (
                _rel(recorder.steps[i + 1]["latent_in"], tensors[f"step{i}.latent_out"])
                <= tol["per_step_rel_l2"]
            )
    assert video.shape == tensors["expected_video"].shape
    assert _rel(video, tensors["expected_video"]) <= tol["video_rel_l2"]


def test_conditioning_latent_matches_the_reference(reference_run: tuple, fixture_models: Any, wan_ref: Path) -> None:
    from pipeline.i2v import prepare_i2v

    cases, tensors = reference_run
    args = _fixture_call(reference_run, wan_ref)
    inputs = prepare_i2v(
        fixture_models,
        args["image"],
        args["prompt"],
        args["negative_prompt"],
        max_area=args["max_area"],
        frames=args["frames"],
        seed=args["seed"],
        noise=args["noise"],
    )
    assert (inputs.height, inputs.width) == tuple(cases["derived"]["output_hw"])
    assert inputs.seq_len == cases["derived"]["max_seq_len"]
    assert inputs.y[:4, 0].min() == 1 and inputs.y[:4, 1:].abs().max() == 0  # mask: frame 0 only
    assert _rel(inputs.y[4:], tensors["y_latent"]) <= cases["tolerance"]["y_latent_rel_l2"]


def test_cancel_stops_at_a_step_boundary(reference_run: tuple, fixture_models: Any, wan_ref: Path) -> None:
    from pipeline.i2v import GenerationCancelled, generate_i2v

    args = _fixture_call(reference_run, wan_ref)
    image, prompt, negative = args.pop("image"), args.pop("prompt"), args.pop("negative_prompt")
    progress: list[tuple[str, int, int]] = []
    sampled = lambda: sum(p[0] == "sampling" for p in progress)  # noqa: E731
    with pytest.raises(GenerationCancelled, match="before sampling step 3 of"):
        generate_i2v(
            fixture_models,
            image,
            prompt,
            negative,
            on_progress=lambda *p: progress.append(p),
            should_cancel=lambda: sampled() >= 2,
            **args,
        )
    assert [p for p in progress if p[0] == "sampling"] == [
        ("sampling", 1, args["steps"]),
        ("sampling", 2, args["steps"]),
    ]


def test_bad_parameters_are_named_before_any_work(reference_run: tuple, fixture_models: Any, wan_ref: Path) -> None:
    import torch

    from pipeline.i2v import I2VParameterError, generate_i2v

    args = _fixture_call(reference_run, wan_ref)
    image, prompt, negative = args.pop("image"), args.pop("prompt"), args.pop("negative_prompt")
    with pytest.raises(I2VParameterError, match="frames: got 8, expected 4n\\+1"):
        generate_i2v(fixture_models, image, prompt, negative, **{**args, "frames": 8})
    with pytest.raises(I2VParameterError, match="seed: got -1"):
        generate_i2v(fixture_models, image, prompt, negative, **{**args, "seed": -1})
    with pytest.raises(I2VParameterError, match="noise: got shape"):
        generate_i2v(fixture_models, image, prompt, negative, **{**args, "noise": torch.zeros(16, 2, 6, 8)})
    with pytest.raises(ValueError, match="guide_scale"):
        generate_i2v(fixture_models, image, prompt, negative, **{**args, "guide_scale": (1.0, 2.0, 3.0)})
    with pytest.raises(I2VParameterError, match="without a text encoder"):
        generate_i2v(fixture_models, image, "a text prompt", negative, **args)
    with pytest.raises(I2VParameterError, match="image: got"):
        generate_i2v(fixture_models, np.zeros((4, 4), dtype=np.uint8), prompt, negative, **args)


def test_same_seed_same_noise_on_the_device() -> None:
    import torch

    from pipeline.i2v import initial_noise

    a = initial_noise(42, (16, 3, 6, 8), torch.device("cpu"))
    expected = torch.randn(16, 3, 6, 8, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, expected)
    assert not torch.equal(initial_noise(43, (16, 3, 6, 8), torch.device("cpu")), a)


@pytest.mark.gpu
def test_reference_run_on_cuda_stays_close(reference_run: tuple, wan_ref: Path) -> None:
    import torch

    from pipeline.i2v import I2VModels, generate_i2v, initial_noise
    from pipeline.models.vae import WanVAE
    from pipeline.weights.loader import load_i2v_experts

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device("cuda")
    high, low = load_i2v_experts(wan_ref / "dit_i2v", device=cuda)
    vae = WanVAE.from_checkpoint(wan_ref / "vae" / "Wan2.1_VAE.pth", device=cuda)
    models = I2VModels(high, low, vae, None, cuda, torch.float32)
    args = _fixture_call(reference_run, wan_ref)
    image, prompt, negative = args.pop("image"), args.pop("prompt"), args.pop("negative_prompt")
    video = generate_i2v(models, image, prompt, negative, **args)
    assert video.is_cuda
    # the fused CUDA attention kernels take bf16 q/k/v (as the reference's flash attention): loose bound
    assert _rel(video.cpu(), reference_run[1]["expected_video"]) < 5e-2
    first = initial_noise(42, (16, 3, 6, 8), cuda)
    assert first.is_cuda and torch.equal(first, initial_noise(42, (16, 3, 6, 8), cuda))


def test_sequence_length_rounds_up_to_the_sequence_parallel_size() -> None:
    from pipeline.i2v import sequence_length

    class FourRanks:
        world_size = 4

    assert sequence_length(3, 6, 8, None) == 36
    assert sequence_length(3, 6, 10, FourRanks()) == 48  # 45 tokens -> 48
    assert sequence_length(21, 90, 160, FourRanks()) == 75600  # 720p, already a multiple
