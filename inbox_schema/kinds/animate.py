"""The `animate` kind: a character image performs a driving video's motion (or replaces its person), Animate-14B.

Its registry entry, its [animate] table and that table's checks; it must not read files or know the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from inbox_schema import defaults as d
from inbox_schema.kinds.registry import InputRole, Kind, OptionsTable
from inbox_schema.reader import Reader, is_int

MODES = ("animation", "replacement")
REFERT_NUMS = (1, 5)
CLIP_LEN_RANGE = (5, 161)
DEFAULT_CLIP_LEN = 77
PREPROCESS_FPS_RANGE = (1, 60)  # or -1 for the source video's fps
DEFAULT_PREPROCESS_FPS = 30
# relighting_lora = "reference": as the official generate.py, whose PEFT load silently drops every key of the
# relighting LoRA, so the LoRA is not applied; for someone who needs the official pixels (README).
RELIGHTING_REFERENCE = "reference"
KEYS = ("mode", "refert_num", "clip_len", "retarget", "relighting_lora", "preprocess_fps")


@dataclass(frozen=True)
class AnimateSettings:
    mode: str  # "animation" | "replacement"
    refert_num: int
    clip_len: int
    retarget: bool
    relighting_lora: bool | str  # true, false, or RELIGHTING_REFERENCE
    preprocess_fps: int  # -1 = the driving video's own fps

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def read_animate(r: Reader, table: dict) -> AnimateSettings:
    """The [animate] table, every problem reported through `r`."""
    mode = r.choice(table, "mode", "animate.mode", "animation", MODES)
    refert = table.get("refert_num", 1)
    if refert not in REFERT_NUMS or not is_int(refert):
        r.error("animate.refert_num", refert, "1 or 5 (frames carried over from one clip to the next)")
        refert = 1
    clip_len = r.count_4n1(table, "clip_len", "animate.clip_len", DEFAULT_CLIP_LEN, *CLIP_LEN_RANGE)
    if clip_len < refert + 4:
        r.error("animate.clip_len", clip_len,
                f"at least refert_num + 4 = {refert + 4} (each clip must add new frames)")
    retarget = r.boolean(table, "retarget", "animate.retarget", False)
    if retarget and mode == "replacement":
        r.error("animate.retarget", True,
                'false with mode = "replacement" (retargeting only applies to mode = "animation")')
        retarget = False
    relight: bool | str = table.get("relighting_lora", False)
    if not isinstance(relight, bool) and relight != RELIGHTING_REFERENCE:
        r.error("animate.relighting_lora", relight,
                f'true, false or "{RELIGHTING_REFERENCE}" (as the official code, which loads the LoRA but drops '
                "every key of it: not applied)")
        relight = False
    fps = table.get("preprocess_fps", DEFAULT_PREPROCESS_FPS)
    low, high = PREPROCESS_FPS_RANGE
    if not is_int(fps) or not (fps == -1 or low <= fps <= high):
        r.error("animate.preprocess_fps", fps, f"a whole number from {low} to {high}, or -1 for the video's own fps")
        fps = DEFAULT_PREPROCESS_FPS
    return AnimateSettings(mode=mode, refert_num=refert, clip_len=clip_len, retarget=retarget,
                           relighting_lora=relight, preprocess_fps=fps)


def json_schema() -> dict:
    """The [animate] table as JSON Schema (inbox_schema/jsonschema.py puts it in the manifest's schema)."""
    return {
        "type": "object", "additionalProperties": False,
        "properties": {
            "mode": {"enum": list(MODES), "default": "animation"},
            "refert_num": {"enum": list(REFERT_NUMS), "default": 1},
            "clip_len": {"enum": [n for n in range(CLIP_LEN_RANGE[0], CLIP_LEN_RANGE[1] + 1) if n % 4 == 1],
                         "default": DEFAULT_CLIP_LEN},
            "retarget": {"type": "boolean", "default": False},
            "relighting_lora": {"anyOf": [{"type": "boolean"}, {"const": RELIGHTING_REFERENCE}], "default": False},
            "preprocess_fps": {"anyOf": [{"const": -1}, {"type": "integer", "minimum": PREPROCESS_FPS_RANGE[0],
                                                         "maximum": PREPROCESS_FPS_RANGE[1]}]},
        },
        "if": {"required": ["mode"], "properties": {"mode": {"const": "replacement"}}},
        "then": {"properties": {"retarget": {"const": False}}},
    }


def output_fps(settings: AnimateSettings) -> int | None:
    # Animate plays back at the rate its driving frames were sampled, so motion keeps its speed; with
    # preprocess_fps = -1 that rate is the video's own, known only to preprocessing (None).
    return settings.preprocess_fps if settings.preprocess_fps > 0 else None


ANIMATE = Kind(
    name="animate",
    model_id="animate-14B",
    model_folder="Wan2.2-Animate-14B",
    purpose="animate a character",
    inputs=(InputRole("character", "image", "hero.png"), InputRole("video", "video", "dance.mp4")),
    sizes=("1280*720", "720*1280"),
    default_steps=20,
    default_fps=30,
    default_guide=1.0,
    guide_above_zero=True,  # the Animate pipeline rejects guide_scale <= 0 (1.0 turns guidance off)
    default_prompt=d.DEFAULT_ANIMATE_PROMPT,
    frames=False,
    length_note="animate's length follows the driving video, in clips of animate.clip_len frames",
    options=OptionsTable(table="animate", keys=KEYS, settings=AnimateSettings, read=read_animate,
                         default_fps=output_fps, json_schema=json_schema),
    prepare="pipeline.preprocess.animate.job:prepare_animate_job",
    family="pipeline.families.animate:AnimateFamily",
    layout="pipeline.weights.layouts:ANIMATE_14B",
    outputs=(("preview", "animate/preview.mp4"),),
)
