"""The manifest contract as JSON Schema (draft 2020-12), for editors' completion and linting.

Generated from the same constants as validation; an editor aid only: it must not replace
`load_manifest`, which also checks what JSON Schema cannot (paths on disk, cross-field rules' hints).
"""

from __future__ import annotations

import json

from inbox_schema import defaults as d
from inbox_schema import loras
from inbox_schema.kinds import Kind, kinds
from inbox_schema.notify import MAX_JOB_URLS, NOTIFY_EVENTS
from inbox_schema.presets import PRESETS
from inbox_schema.vocabulary import vocabulary

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _any_case(text: str) -> str:
    """A regex matching `text` in any letter case (JSON Schema patterns have no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else (f"\\{c}" if c == "." else c) for c in text)


def _path_pattern(suffixes: tuple[str, ...]) -> str:
    # Relative, "/"-separated, no backslash, drive letter, "~" start, or any component starting with "."
    # (which covers ".." and hidden or temporary names), ending with one of the role's suffixes.
    ends = "|".join(_any_case(s) for s in suffixes)
    return rf"^(?![/~])(?![A-Za-z]:)(?!(.*/)?\.)(?!.*\\)[^\x00-\x1f]+({ends})$"


def _input(role: str, media: str) -> dict:
    path = {"type": "string", "pattern": _path_pattern(d.MEDIA_SUFFIXES[media]),
            "description": f"the {role} file, relative to the manifest and inside the inbox"}
    return {"oneOf": [path, {
        "type": "object", "additionalProperties": False, "required": ["path"],
        "properties": {
            "path": path,
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "sha256sum of the file"},
            "size": {"type": "integer", "minimum": 1, "description": "file size in bytes"},
        },
    }]}


def counts_4n1(low: int, high: int) -> list[int]:
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
            "preset": {"enum": list(PRESETS), "description": "; ".join(f"{p.name}: {p.purpose}"
                                                                        for p in PRESETS.values())},
        },
        "if": {"required": ["solver"], "properties": {"solver": {"const": "euler"}}},
        "then": {"required": ["timesteps"]},
        "else": {"not": {"required": ["timesteps"]}},
    }


def _lora() -> dict:
    """[[lora]]: a library name or an uploaded file, a strength, an expert (two-expert kinds)."""
    library = {"type": "string", "pattern": r"^(?![/~])(?![A-Za-z]:)(?!(.*/)?\.)(?!.*\\)[^\x00-\x1f]+("
                                            + "|".join(_any_case(s) for s in loras.SUFFIXES) + ")$",
               "description": "a file in the server's LoRA library (<models>/loras/), named relative to it"}
    path = {"type": "string", "pattern": _path_pattern(loras.SUFFIXES),
            "description": "an uploaded LoRA file, relative to the manifest and inside the inbox"}
    low, high = loras.STRENGTH_RANGE
    entry = {
        "type": "object", "additionalProperties": False,
        "oneOf": [{"required": ["library"], "not": {"required": ["path"]}},
                  {"required": ["path"], "not": {"required": ["library"]}}],
        "properties": {
            "library": library, "path": path,
            "strength": {"type": "number", "minimum": low, "maximum": high, "not": {"const": 0}, "default": 1.0},
            "expert": {"enum": [*loras.EXPERTS, loras.BOTH], "default": loras.BOTH},
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "sha256sum of the file"},
            "size": {"type": "integer", "minimum": 1, "description": "file size in bytes (uploads)"},
        },
    }
    return {"type": "array", "maxItems": loras.MAX_LORAS, "items": entry}


def _kind_rule(kind: Kind, roles: list[str], tables: list[str]) -> dict:
    """What differs for one kind: its required inputs and keys, its sizes, the keys of other kinds it lacks."""
    words = vocabulary()
    required = ["inputs"] if kind.default_prompt is not None else ["prompt", "inputs"]
    properties: dict = {table: False for table in tables if kind.name not in words.keys("")[table]}
    properties["inputs"] = {"required": list(kind.roles),
                            "properties": {role: False for role in roles if role not in kind.roles}}
    video: dict = {"size": {"enum": list(kind.sizes)}}
    if not kind.frames:
        video["frames"] = False
    properties["video"] = {"properties": video}
    if kind.experts == 1:
        guide: dict = {"type": "number"}
        if kind.guide_above_zero:
            guide["exclusiveMinimum"] = d.GUIDE_RANGE[0]
        properties["sampling"] = {"properties": {"boundary": False, "guide_scale": guide}}
        properties["lora"] = {"items": {"properties": {"expert": False}}}
    presets = [p.name for p in PRESETS.values() if kind.name in p.values]
    properties.setdefault("sampling", {"properties": {}})["properties"]["preset"] = {"enum": presets}
    return {"required": required, "properties": properties}


def _kind_rules(roles: list[str], tables: list[str]) -> list[dict]:
    return [{"if": {"properties": {"kind": {"const": kind.name}}}, "then": _kind_rule(kind, roles, tables)}
            for kind in kinds().values()]


def json_schema() -> dict:
    """The JSON Schema of manifest schema v1 (TOML manifests map 1:1 onto JSON objects)."""
    text = {"type": "string", "minLength": 1, "maxLength": d.PROMPT_MAX_CHARS, "pattern": r"\S"}
    registry = kinds()
    media = {role.name: role.media for kind in registry.values() for role in kind.inputs}
    sizes = list(dict.fromkeys(size for kind in registry.values() for size in kind.sizes))
    tables = {kind.options.table: kind.options.json_schema() for kind in registry.values()
              if kind.options is not None and kind.options.json_schema is not None}
    return {
        "$schema": DRAFT,
        "title": f"wanbox job manifest, schema {d.SCHEMA_VERSION}",
        "type": "object", "additionalProperties": False, "required": ["schema", "kind"],
        "properties": {
            "schema": {"const": d.SCHEMA_VERSION},
            "kind": {"enum": list(registry)},
            "name": {"type": "string", "pattern": f"^{d.NAME_PATTERN}$", "maxLength": d.NAME_MAX_CHARS},
            "priority": {"type": "integer", "minimum": d.PRIORITY_RANGE[0], "maximum": d.PRIORITY_RANGE[1],
                         "default": 0},
            "prompt": text,
            "negative_prompt": text,
            "inputs": {"type": "object", "additionalProperties": False,
                       "properties": {role: _input(role, kind) for role, kind in media.items()}},
            "video": {"type": "object", "additionalProperties": False, "properties": {
                "size": {"enum": sizes, "default": d.DEFAULT_SIZE},
                "frames": {"enum": counts_4n1(*d.FRAMES_RANGE), "default": d.DEFAULT_FRAMES},
                "fps": {"type": "integer", "minimum": d.FPS_RANGE[0], "maximum": d.FPS_RANGE[1]},
            }},
            "sampling": _sampling(),
            "notify": {"type": "object", "additionalProperties": False, "properties": {
                "urls": {"type": "array", "maxItems": MAX_JOB_URLS,
                         "items": {"type": "string", "pattern": "^https?://[^/?#]+"}},
                "events": {"type": "array", "minItems": 1, "items": {"enum": list(NOTIFY_EVENTS)}},
            }},
            "lora": _lora(),
            **tables,
        },
        "allOf": _kind_rules(list(media), list(tables)),
    }


def json_schema_text() -> str:
    """The exact text of the committed inbox_schema/manifest.schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
