"""Input-image preparation for I2V on the CPU pool: decode, apply EXIF orientation, RGB, output size, PNG.

Runs in the supervisor's CPU process pool, so it must not import torch; the exact bicubic resize stays on
the GPU side (pipeline/i2v.py), as in the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inbox_schema import Job
from pipeline.preprocess.contract import Prepared, PreprocessFailed, PrepSettings, Progress

VAE_STRIDE = 8  # pixels per latent cell, height and width
PATCH = 2  # DiT patch size in latent cells, so latent sides are even
EXIF_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """The input image cannot be used; the message names the file, the problem and what is expected."""


def latent_size(width: int, height: int, max_area: int) -> tuple[int, int]:
    """(lat_h, lat_w) exactly as the reference: floor(floor(sqrt(A*ar)/8)/2)*2 with ar = h/w (float64)."""
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image size: got {width}x{height}, expected positive width and height")
    if max_area <= 0:
        raise ImageInputError(f"max_area: got {max_area!r}, expected a positive pixel count, e.g. 399360")
    aspect = height / width
    lat_h = round(np.sqrt(max_area * aspect) // VAE_STRIDE // PATCH * PATCH)
    lat_w = round(np.sqrt(max_area / aspect) // VAE_STRIDE // PATCH * PATCH)
    if lat_h < PATCH or lat_w < PATCH:
        raise ImageInputError(
            f"max_area: {max_area} px with a {width}x{height} image gives a {lat_w * 8}x{lat_h * 8} output; "
            f"expected an area and aspect that give at least 16 px per side")
    return lat_h, lat_w


def output_size(width: int, height: int, max_area: int) -> tuple[int, int]:
    """Output (W, H) of the video for an input image of width x height and a pixel budget max_area."""
    lat_h, lat_w = latent_size(width, height, max_area)
    return lat_w * VAE_STRIDE, lat_h * VAE_STRIDE


def load_image(src: str | os.PathLike[str], shown: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Decode `src` fully, turn it upright by its EXIF orientation, convert to RGB; report what was done.

    Errors name the file as `shown` (e.g. as the user uploaded it) when given, else by its path."""
    path = Path(src)
    name = shown or str(path)
    if not path.is_file():
        raise ImageInputError(f"image file {name}: not found; expected an existing JPEG/PNG/WebP file")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file must fail here, not on the GPU worker
            source_format, source_mode = opened.format, opened.mode
            orientation = int(opened.getexif().get(EXIF_ORIENTATION, 1) or 1)
            upright = ImageOps.exif_transpose(opened)
            rgb = upright.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"image file {name}: cannot be decoded ({err}); "
                              f"expected a complete JPEG, PNG or WebP image") from err
    info = {
        "source_format": source_format,
        "source_mode": source_mode,
        "source_width": rgb.width if orientation < 5 else rgb.height,
        "source_height": rgb.height if orientation < 5 else rgb.width,
        "exif_orientation": orientation,
        "orientation_applied": orientation not in (1, 0),
    }
    return rgb, info


def prepare_image(src: str | os.PathLike[str], dest: str | os.PathLike[str], max_area: int,
                  shown: str | None = None) -> dict[str, Any]:
    """Write the upright RGB image to `dest` (PNG, full resolution) and return its size information.
    Errors name the file as `shown` when given (see load_image).

    Keys: width/height (output video size), lat_h/lat_w, image_width/image_height (upright input),
    source_* (as stored in the file), exif_orientation, orientation_applied, path.
    """
    rgb, info = load_image(src, shown)
    lat_h, lat_w = latent_size(rgb.width, rgb.height, max_area)
    dest_path = Path(dest)
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    partial = dest_path.with_name(f".{dest_path.name}.partial")
    try:
        rgb.save(partial, format="PNG")
    except BaseException:
        partial.unlink(missing_ok=True)  # on a full disk, half a PNG would only hold on to the space
        raise
    os.replace(partial, dest_path)  # the worker never sees a half-written PNG
    return {
        **info,
        "image_width": rgb.width,
        "image_height": rgb.height,
        "width": lat_w * VAE_STRIDE,
        "height": lat_h * VAE_STRIDE,
        "lat_h": lat_h,
        "lat_w": lat_w,
        "max_area": max_area,
        "path": str(dest_path),
    }


def prepare_i2v_job(job: Job, work_dir: Path, settings: PrepSettings, progress: Progress) -> Prepared:
    """The `i2v` kind's preparation (its registry entry names it): the input image as the pool's prepared PNG."""
    target, image = work_dir / "prepared.png", job.inputs["image"]
    try:  # errors name the image as the user uploaded it, not where the daemon keeps it
        info = prepare_image(image.path, target, job.video.max_area, shown=repr(image.relpath))
    except ImageInputError as exc:
        raise PreprocessFailed(f"inputs.image: {exc}") from None
    return Prepared({"image": str(target)}, info)
