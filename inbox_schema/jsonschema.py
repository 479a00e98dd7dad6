"""The manifest contract as JSON Schema (draft 2020-12), for editors' completion and linting.

Generated from the same constants as validation; an editor aid only: it must not replace
`load_manifest`, which also checks what JSON Schema cannot (paths on disk, cross-field rules' hints).
"""

from __future__ import annotations

import json

from inbox_schema import defaults as d

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _any_case(text: str) -> str:
    """A regex matching `text` in any letter case (JSON Schema patterns have no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else (f"\\{c}" if c == "." else c) for c in text)


def _path_pattern(suffixes: tuple[str, ...]) -> str:
    # Relative, "/"-separated, no backslash, drive letter, "~" start, or any component starting with "."
    # (which covers ".." and hidden or temporary names), ending with one of the role's suffixes.
    ends = "|".join(_any_case(s) for s in suffixes)
    return rf"^(?![/~])(?![A-Za-z]:)(?!(.*/)?\.)(?!.*\\)[^\x00-\x1f]+({ends})$"


def _input(role: str) -> dict:
    path = {"type": "string", "pattern": _path_pattern(d.ROLE_SUFFIXES[role]),
            "description": f"the {role} file, relative to the manifest and inside the inbox"}
    return {"oneOf": [path, {
        "type": "object", "additionalProperties": False, "required": ["path"],
        "properties": {
            "path": path,
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "sha256sum of the file"},
            "size": {"type": "integer", "minimum": 1, "description": "file size in bytes"},
        },
    }]}


def _counts_4n1(low: int, high: int) -> list[int]:
    return [n for n in range(low, high + 1) if n % 4 == 1]


def _number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> dict:
    return {"type": "number", ("exclusiveMinimum" if low_open else "minimum"): low,
            ("exclusiveMaximum" if high_open else "maximum"): high}


def _sampling() -> dict:
    guide = _number(*d.GUIDE_RANGE)
    return {
        "type": "object", "additionalProperties": False,
        "properties": {
            "steps": {"type": "integer", "minimum": d.STEPS_RANGE[0], "maximum": d.STEPS_RANGE[1]},
            "shift": _number(*d.SHIFT_RANGE, low_open=True),
            "guide_scale": {"oneOf": [guide, {"type": "array", "items": guide, "minItems": 2, "maxItems": 2}],
                            "description": "one number, or [low_noise, high_noise] for i2v"},
            "solver": {"enum": list(d.SOLVERS), "default": d.DEFAULT_SOLVER},
            "seed": {"type": "integer", "minimum": d.SEED_RANGE[0], "maximum": d.SEED_RANGE[1],
                     "description": "leave out for a random seed, drawn and recorded at acceptance"},
            "boundary": _number(*d.BOUNDARY_RANGE, low_open=True, high_open=True),
            "timesteps": {"type": "array", "minItems": 1, "maxItems": d.STEPS_RANGE[1],
                          "items": {"type": "integer", "minimum": d.TIMESTEP_RANGE[0],
                                    "maximum": d.TIMESTEP_RANGE[1]}},
        },
        "if": {"required": ["solver"], "properties": {"solver": {"const": "euler"}}},
        "then": {"required": ["timesteps"]},
        "else": {"not": {"required": ["timesteps"]}},
    }


def _animate() -> dict:
    return {
        "type": "object", "additionalProperties": False,
        "properties": {
            "mode": {"enum": list(d.ANIMATE_MODES), "default": "animation"},
            "refert_num": {"enum": list(d.REFERT_NUMS), "default": 1},
            "clip_len": {"enum": _counts_4n1(*d.CLIP_LEN_RANGE), "default": d.DEFAULT_CLIP_LEN},
            "retarget": {"type": "boolean", "default": False},
            "relighting_lora": {"type": "boolean", "default": False},
            "preprocess_fps": {"anyOf": [{"const": -1}, {"type": "integer", "minimum": d.PREPROCESS_FPS_RANGE[0],
                                                         "maximum": d.PREPROCESS_FPS_RANGE[1]}]},
        },
        "if": {"required": ["mode"], "properties": {"mode": {"const": "replacement"}}},
        "then": {"properties": {"retarget": {"const": False}}},
    }


def _kind_rules() -> list[dict]:
    i2v = {
        "required": ["prompt", "inputs"],
        "properties": {
            "animate": False,
            "inputs": {"required": ["image"], "properties": {"character": False, "video": False}},
            "video": {"properties": {"size": {"enum": list(d.SIZES["i2v"])}}},
        },
    }
    animate = {
        "required": ["inputs"],
        "properties": {
            "inputs": {"required": ["character", "video"], "properties": {"image": False}},
            "video": {"properties": {"size": {"enum": list(d.SIZES["animate"])}, "frames": False}},
            "sampling": {"properties": {"boundary": False, "guide_scale": {"type": "number"}}},
        },
    }
    return [{"if": {"properties": {"kind": {"const": kind}}}, "then": rule}
            for kind, rule in (("i2v", i2v), ("animate", animate))]


def json_schema() -> dict:
    """The JSON Schema of manifest schema v1 (TOML manifests map 1:1 onto JSON objects)."""
    text = {"type": "string", "minLength": 1, "maxLength": d.PROMPT_MAX_CHARS, "pattern": r"\S"}
    return {
        "$schema": DRAFT,
        "title": f"wanbox job manifest, schema {d.SCHEMA_VERSION}",
        "type": "object", "additionalProperties": False, "required": ["schema", "kind"],
        "properties": {
            "schema": {"const": d.SCHEMA_VERSION},
            "kind": {"enum": list(d.KINDS)},
            "name": {"type": "string", "pattern": f"^{d.NAME_PATTERN}$", "maxLength": d.NAME_MAX_CHARS},
            "priority": {"type": "integer", "minimum": d.PRIORITY_RANGE[0], "maximum": d.PRIORITY_RANGE[1],
                         "default": 0},
            "prompt": text,
            "negative_prompt": text,
            "inputs": {"type": "object", "additionalProperties": False,
                       "properties": {role: _input(role) for role in ("image", "character", "video")}},
            "video": {"type": "object", "additionalProperties": False, "properties": {
                "size": {"enum": list(d.SIZES["i2v"]), "default": d.DEFAULT_SIZE},
                "frames": {"enum": _counts_4n1(*d.FRAMES_RANGE), "default": d.DEFAULT_FRAMES},
                "fps": {"type": "integer", "minimum": d.FPS_RANGE[0], "maximum": d.FPS_RANGE[1]},
            }},
            "sampling": _sampling(),
            "animate": _animate(),
        },
        "allOf": _kind_rules(),
    }


def json_schema_text() -> str:
    """The exact text of the committed inbox_schema/manifest.schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
