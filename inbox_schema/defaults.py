"""The numbers of schema v1 that every kind shares: allowed values, bounds and the reference's defaults.

Plain constants shared by validation, the JSON Schema and the docs; no logic lives here. What differs per kind
(model, inputs, sizes, default steps, fps and guidance) is the kind's registry entry (inbox_schema/kinds/).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# The reference's shared default negative prompt (wan_shared_cfg.sample_neg_prompt), verbatim.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Animate's fixed prompt in the reference ("the person in the video is doing actions").
DEFAULT_ANIMATE_PROMPT = "视频中的人在做动作"

DEFAULT_SIZE = "1280*720"

PRIORITY_RANGE = (-100, 100)
PROMPT_MAX_CHARS = 10_000
NAME_MAX_CHARS = 100
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"

# Frame counts are 4n+1 so that latent frames (F-1)/4+1 decode back to exactly F frames.
FRAMES_RANGE = (5, 161)
DEFAULT_FRAMES = 81
FPS_RANGE = (1, 60)

STEPS_RANGE = (1, 100)
SHIFT_RANGE = (0.0, 100.0)  # exclusive low end: shift must be positive
DEFAULT_SHIFT = 5.0
GUIDE_RANGE = (0.0, 20.0)
SOLVERS = ("unipc", "dpm++", "euler")
DEFAULT_SOLVER = "unipc"
SEED_RANGE = (0, 2**63 - 1)  # the reference draws random seeds from 0..sys.maxsize
BOUNDARY_RANGE = (0.0, 1.0)  # exclusive at both ends
DEFAULT_BOUNDARY = 0.9
TIMESTEP_RANGE = (1, 1000)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
MEDIA_SUFFIXES = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}
MANIFEST_MAX_BYTES = 256 * 1024
