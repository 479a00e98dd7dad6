"""The mediapipe model files of the animate preprocessing: official names, URLs, pinned sha256, fetch and find.

Knows where files live and verifies them; it must not load or run a model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelsMissingError

BASE = "https://storage.googleapis.com/mediapipe-models"


@dataclass(frozen=True)
class ModelFile:
    """One official mediapipe task file. sha256 is None where it could not be verified offline."""

    name: str
    url: str
    sha256: str | None
    role: str


MODELS: tuple[ModelFile, ...] = (
    ModelFile(
        "pose_landmarker_heavy.task",
        f"{BASE}/pose_landmarker/pose_landmarker_heavy/float16/latest/pose_landmarker_heavy.task",
        None,  # not available offline to hash; verified by size/format only when loaded
        "pose (default: most accurate)",
    ),
    ModelFile(
        "pose_landmarker_full.task",
        f"{BASE}/pose_landmarker/pose_landmarker_full/float16/latest/pose_landmarker_full.task",
        "4eaa5eb7a98365221087693fcc286334cf0858e2eb6e15b506aa4a7ecdcec4ad",
        "pose (faster)",
    ),
    ModelFile(
        "face_landmarker.task",
        f"{BASE}/face_landmarker/face_landmarker/float16/latest/face_landmarker.task",
        "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
        "face mesh (face crops)",
    ),
    ModelFile(
        "hand_landmarker.task",
        f"{BASE}/hand_landmarker/hand_landmarker/float16/latest/hand_landmarker.task",
        "fbc2a30080c3c557093b5ddfc334698132eb341044ccee322ccf8bcf3607cde1",
        "hands",
    ),
    ModelFile(
        "selfie_segmenter.tflite",
        f"{BASE}/image_segmenter/selfie_segmenter/float16/latest/selfie_segmenter.tflite",
        "191ac9529ae506ee0beefa6b2c945a172dab9d07d1e802a290a4e4038226658b",
        "person segmentation (replacement masks)",
    ),
)
BY_NAME = {model.name: model for model in MODELS}
POSE_VARIANTS = ("heavy", "full")
MEDIAPIPE_SUBDIR = "mediapipe"  # fetch_models(models_dir / MEDIAPIPE_SUBDIR) keeps them apart from checkpoints


@dataclass(frozen=True)
class ModelPaths:
    """The files one preprocessing run loads."""

    pose: Path
    face: Path
    hands: Path
    segmenter: Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _how_to_get(models_dir: Path) -> str:
    return f"run `wanbox models pull animate-14B` or download it from its official URL into {models_dir}"


def _checked(models_dir: Path, name: str, verify: bool) -> Path:
    path = models_dir / name
    if not path.is_file():
        raise ModelsMissingError(
            f"models_dir/{name}", str(path), "the official mediapipe file", f"{_how_to_get(models_dir)}: {BY_NAME[name].url}"
        )
    expected = BY_NAME[name].sha256
    if verify and expected is not None and sha256_of(path) != expected:
        raise ModelsMissingError(
            f"models_dir/{name}", f"sha256 {sha256_of(path)}", f"sha256 {expected}", "corrupt or changed file: " + _how_to_get(models_dir)
        )
    return path


def mediapipe_dir(models_dir: Path) -> Path:
    """Where the files are: `models_dir` itself, or its `mediapipe/` folder (the layout `wanbox models pull
    animate-14B` writes beside the checkpoints), whichever holds any of them."""
    nested = models_dir / MEDIAPIPE_SUBDIR
    if not any((models_dir / model.name).is_file() for model in MODELS) and nested.is_dir():
        return nested
    return models_dir


def find_models(models_dir: Path, variant: str = "heavy", verify: bool = False) -> ModelPaths:
    """Paths of the four files for `variant` ("heavy" or "full"), or ModelsMissingError naming the missing one."""
    if variant not in POSE_VARIANTS:
        raise ModelsMissingError("pose_variant", variant, f"one of {', '.join(POSE_VARIANTS)}")
    models_dir = mediapipe_dir(models_dir)
    return ModelPaths(
        pose=_checked(models_dir, f"pose_landmarker_{variant}.task", verify),
        face=_checked(models_dir, "face_landmarker.task", verify),
        hands=_checked(models_dir, "hand_landmarker.task", verify),
        segmenter=_checked(models_dir, "selfie_segmenter.tflite", verify),
    )


def fetch_models(dest: Path, names: tuple[str, ...] | None = None, timeout_s: float = 120.0,
                 mirror: str | None = None) -> list[Path]:  # fmt: skip
    """Download the official files into `dest` (skipping those already present and verified), checking sha256.

    `mirror` replaces the official location with `<mirror>/<file name>` (an internal mirror, or file:// for an
    offline copy). Each file is written to a temporary name and renamed, so a failed download never leaves a
    partial model behind."""
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for model in MODELS if names is None else tuple(BY_NAME[name] for name in names):
        target = dest / model.name
        if not (target.is_file() and (model.sha256 is None or sha256_of(target) == model.sha256)):
            url = model.url if mirror is None else f"{mirror.rstrip('/')}/{model.name}"
            _download(model, url, target, timeout_s)
        fetched.append(target)
    return fetched


def _download(model: ModelFile, url: str, target: Path, timeout_s: float) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{model.name}.", suffix=".part", dir=target.parent)
    try:
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError and timeouts are OSErrors
            raise ModelsMissingError(model.name, url, "a reachable download location", str(exc)) from exc
        actual = sha256_of(Path(temporary))
        if model.sha256 is not None and actual != model.sha256:
            raise ModelsMissingError(model.name, f"sha256 {actual}", f"sha256 {model.sha256}", f"downloaded from {url}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
