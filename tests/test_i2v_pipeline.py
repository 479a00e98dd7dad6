"""I2V input preparation and the I2V pipeline function, checked against the reference pipeline fixture.

Uses real files (the shared photo, generated JPEG/PNG files, the tiny reference checkpoints); no fakes.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocess.image import ImageInputError, latent_size, output_size, prepare_image

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
