"""Reads a TOML manifest (schema v1) into a resolved Job, reporting every problem at once.

Checks text and, optionally, where inputs point (lstat only); it must not hash, move or wait for
input files, and must not pick a random seed (that happens once, at acceptance).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path, PurePosixPath

from inbox_schema import defaults as d
from inbox_schema.errors import MISSING, ManifestError, ManifestInvalid
from inbox_schema.job import AnimateSettings, InputFile, Job, SamplingSettings, VideoSettings
from inbox_schema.lines import KeyLines
from inbox_schema.paths import on_disk_problem, relative_base, relpath_problem
from inbox_schema.reader import Reader, is_int, is_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BOTH = ("i2v", "animate")
I2V = ("i2v",)
ANIMATE = ("animate",)
TOP_KEYS = {"schema": BOTH, "kind": BOTH, "name": BOTH, "priority": BOTH, "prompt": BOTH,
            "negative_prompt": BOTH, "inputs": BOTH, "video": BOTH, "sampling": BOTH, "animate": ANIMATE}
VIDEO_KEYS = {"size": BOTH, "frames": I2V, "fps": BOTH}
SAMPLING_KEYS = {"steps": BOTH, "shift": BOTH, "guide_scale": BOTH, "solver": BOTH, "seed": BOTH,
                 "boundary": I2V, "timesteps": BOTH}
ANIMATE_KEYS = {"mode": ANIMATE, "refert_num": ANIMATE, "clip_len": ANIMATE, "retarget": ANIMATE,
                "relighting_lora": ANIMATE, "preprocess_fps": ANIMATE}
INPUT_KEYS = {"image": I2V, "character": ANIMATE, "video": ANIMATE}
INPUT_TABLE_KEYS = {"path": BOTH, "sha256": BOTH, "size": BOTH}

# Where a key that landed in the wrong table belongs. A top-level key written below a [table]
# header belongs to that table in TOML, the most common manifest mistake.
_TABLE_OF = {**{key: "video" for key in VIDEO_KEYS}, **{key: "sampling" for key in SAMPLING_KEYS},
             **{key: "animate" for key in ANIMATE_KEYS}, **{key: "inputs" for key in INPUT_KEYS}}
TOP_HINTS = {key: f'; did you mean "{table}.{key}"? (put it under [{table}])' for key, table in _TABLE_OF.items()}
TABLE_HINTS = {**{key: f'; did you mean "{table}.{key}"?' for key, table in _TABLE_OF.items()},
               **{key: f'; "{key}" is a top-level key: move it above the first [table] line' for key in TOP_KEYS}}
# Why a field does not apply to the other kind.
REASONS = {
    "video.frames": " (animate's length follows the driving video, in clips of animate.clip_len frames)",
    "sampling.boundary": " (animate has one model, no expert switch)",
    "animate": ' (set kind = "animate" to animate a character)',
    "inputs.image": " (animate takes inputs.character and inputs.video)",
    "inputs.character": " (i2v takes inputs.image)",
    "inputs.video": " (i2v takes inputs.image)",
}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(d.NAME_PATTERN)
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)|\s*\(at end of document\)")


def load_manifest(path: Path, inbox_root: Path | None = None, check_inputs: bool = True) -> Job:
    """Read, parse and validate the manifest at `path`; raises ManifestInvalid listing every problem."""
    path = Path(path)
    text = _read_text(path)
    return parse_manifest_text(text, path.name, path.parent, inbox_root, check_inputs=check_inputs)


def _read_text(path: Path) -> str:
    def invalid(value: object, expected: str) -> ManifestInvalid:
        return ManifestInvalid([ManifestError("manifest", value, expected)], path.name)

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise invalid(str(path), f"a readable file ({exc.strerror or exc})") from exc
    if len(raw) > d.MANIFEST_MAX_BYTES:
        raise invalid(f"{len(raw)} bytes", f"a manifest of at most {d.MANIFEST_MAX_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"byte {exc.start}", "UTF-8 text (save the file as UTF-8)") from exc


def parse_manifest_text(text: str, source_name: str, base_dir: Path, inbox_root: Path | None = None,
                        check_inputs: bool = True) -> Job:
    """Validate manifest text; `source_name` is the file name (it gives the default job name).

    Input paths are relative to `base_dir` and confined to `inbox_root` (default: `base_dir`).
    With `check_inputs`, inputs that exist are also checked on disk (no symlinks, regular files).
    """
    text = text.removeprefix("\ufeff")  # a byte-order mark from Windows editors is not content
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestInvalid([_syntax_error(exc, text)], source_name) from exc
    reader = Reader(KeyLines(text))
    job = _build_job(reader, data, source_name, Path(base_dir), inbox_root, check_inputs)
    if reader.errors or job is None:
        # In file order, so the list reads top to bottom beside the manifest; unplaced ones last.
        ordered = sorted(reader.errors, key=lambda e: (e.line is None, e.line or 0))
        raise ManifestInvalid(ordered, source_name)
    return job


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str) -> ManifestError:
    message = str(exc)
    position = _TOML_POSITION.search(message)
    line = column = None
    if position and position.group(1):
        line, column = int(position.group(1)), int(position.group(2))
    reason = _TOML_POSITION.sub("", message)
    lines = text.splitlines()
    shown: object = lines[line - 1].strip() if line and line <= len(lines) else MISSING
    return ManifestError("toml", shown, f"valid TOML ({reason})", line, column)


def _build_job(r: Reader, data: dict, source_name: str, base_dir: Path, inbox_root: Path | None,
               check_inputs: bool) -> Job | None:
    if not _schema_ok(r, data):
        return None
    kind = r.choice(data, "kind", "kind", "", d.KINDS)
    if "kind" not in data:
        r.error("kind", MISSING, 'kind = "i2v" or kind = "animate"')
    name = _name(r, data, source_name, base_dir)
    priority = r.integer(data, "priority", "priority", 0, *d.PRIORITY_RANGE)
    if kind not in d.KINDS:
        # Typos are still reported; the checks that depend on the kind wait for a valid kind.
        r.unknown_keys(data, "", dict.fromkeys(TOP_KEYS, BOTH), "i2v", TOP_HINTS)
        return None
    r.unknown_keys(data, "", TOP_KEYS, kind, TOP_HINTS, REASONS)
    animate = _animate(r, r.table(data, "animate", "animate")) if kind == "animate" else None
    inputs = _inputs(r, data, kind, base_dir, inbox_root, check_inputs)
    video = _video(r, r.table(data, "video", "video"), kind, animate)
    sampling = _sampling(r, r.table(data, "sampling", "sampling"), kind)
    default_prompt = d.DEFAULT_ANIMATE_PROMPT if kind == "animate" else None
    prompt = r.text(data, "prompt", "prompt", default_prompt, d.PROMPT_MAX_CHARS)
    negative = r.text(data, "negative_prompt", "negative_prompt", d.DEFAULT_NEGATIVE_PROMPT,
                      d.PROMPT_MAX_CHARS, " (leave the key out to use the reference's default)")
    return Job(schema=d.SCHEMA_VERSION, kind=kind, name=name, priority=priority, prompt=prompt or "",
               negative_prompt=negative or "", inputs=inputs, video=video, sampling=sampling, animate=animate)


def _schema_ok(r: Reader, data: dict) -> bool:
    """False only for another schema version: its fields may mean other things, so stop there.

    A missing or mistyped version is reported, and the rest is still checked as schema 1.
    """
    value = data.get("schema", MISSING)
    if value is MISSING:
        r.error("schema", value, f"schema = {d.SCHEMA_VERSION} (the manifest format version) at the top")
    elif not is_int(value):
        r.error("schema", value, f"{d.SCHEMA_VERSION} (a whole number, without quotes)")
    elif value != d.SCHEMA_VERSION:
        r.error("schema", value, f"{d.SCHEMA_VERSION} (this wanbox reads schema {d.SCHEMA_VERSION} manifests)")
        return False
    return True


def _name(r: Reader, data: dict, source_name: str, base_dir: Path) -> str:
    source = PurePosixPath(source_name.replace("\\", "/"))
    derived = Path(os.path.abspath(base_dir)).name if source.name == "job.toml" else source.stem
    value = data.get("name", MISSING)
    rule = (f'a name of at most {d.NAME_MAX_CHARS} characters: letters, digits, ".", "_" and "-", '
            "starting with a letter or digit")
    if value is MISSING:
        if not _name_ok(derived):
            origin = "folder" if source.name == "job.toml" else "file"
            r.error("name", derived, f'{rule} (taken from the {origin} name; rename it or set name = "...")')
        return derived
    if not isinstance(value, str) or not _name_ok(value):
        r.error("name", value, rule)
        return derived
    return value


def _name_ok(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and len(name) <= d.NAME_MAX_CHARS


def _inputs(r: Reader, data: dict, kind: str, base_dir: Path, inbox_root: Path | None,
            check_inputs: bool) -> dict[str, InputFile]:
    table = r.table(data, "inputs", "inputs")
    r.unknown_keys(table, "inputs.", INPUT_KEYS, kind, TABLE_HINTS, REASONS)
    root = Path(inbox_root) if inbox_root is not None else base_dir
    below = relative_base(base_dir, root)
    if below is None:
        r.error("manifest", str(base_dir), f"a manifest inside the inbox {root}")
        below = PurePosixPath()
    found: dict[str, InputFile] = {}
    for role in d.INPUT_ROLES[kind]:
        item = _input(r, table, role, root.resolve() / below, below, root, check_inputs)
        if item is not None:
            found[role] = item
    return found


def _input(r: Reader, table: dict, role: str, folder: Path, below: PurePosixPath, root: Path,
           check_inputs: bool) -> InputFile | None:
    field = f"inputs.{role}"
    value = table.get(role, MISSING)
    example = {"image": "cat.jpg", "character": "hero.png", "video": "dance.mp4"}[role]
    shape = f'a path like {role} = "{example}", or a table with path, sha256 and size'
    if value is MISSING:
        r.error(field, value, f'{shape} under [inputs] (the {role} this job needs)')
        return None
    if isinstance(value, dict):
        r.unknown_keys(value, field + ".", INPUT_TABLE_KEYS, "i2v")
        return _input_entry(r, value, role, folder, below, root, check_inputs)
    if not isinstance(value, str):
        r.error(field, value, shape)
        return None
    return _input_entry(r, {"path": value}, role, folder, below, root, check_inputs, field)


def _input_entry(r: Reader, entry: dict, role: str, folder: Path, below: PurePosixPath, root: Path,
                 check_inputs: bool, path_field: str | None = None) -> InputFile | None:
    field = f"inputs.{role}"
    path_field = path_field or f"{field}.path"
    relpath = entry.get("path", MISSING)
    ok = _relpath_ok(r, path_field, relpath, role)
    sha256 = entry.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        r.error(f"{field}.sha256", sha256, "64 hexadecimal characters (the output of sha256sum)")
        sha256 = None
    size = entry.get("size")
    if size is not None and not (is_int(size) and size > 0):
        r.error(f"{field}.size", size, "the file size in bytes, a whole number above 0")
        size = None
    if not ok:
        return None
    parts = PurePosixPath(relpath).parts
    if check_inputs:
        problem = on_disk_problem(root.resolve(), below.parts + parts)
        if problem:
            r.error(path_field, relpath, problem)
            return None
    return InputFile(role=role, path=folder.joinpath(*parts), relpath=relpath,
                     sha256=sha256.lower() if sha256 else None, size=size)


def _relpath_ok(r: Reader, field: str, relpath: object, role: str) -> bool:
    if relpath is MISSING or not isinstance(relpath, str):
        r.error(field, relpath, 'the file\'s path relative to the manifest, e.g. path = "media/cat.jpg"')
        return False
    problem = relpath_problem(relpath)
    if problem:
        r.error(field, relpath, problem)
        return False
    suffixes = d.ROLE_SUFFIXES[role]
    if not relpath.lower().endswith(suffixes):
        what = "a video" if role == "video" else "an image"
        r.error(field, relpath, f"{what} file ({', '.join(suffixes)})")
        return False
    return True


def _video(r: Reader, table: dict, kind: str, animate: AnimateSettings | None) -> VideoSettings:
    r.unknown_keys(table, "video.", VIDEO_KEYS, kind, TABLE_HINTS, REASONS)
    allowed = d.SIZES[kind]
    note = ' for kind = "animate" (832*480 and 480*832 are i2v only)' if kind == "animate" else ""
    size = r.choice(table, "size", "video.size", d.DEFAULT_SIZE, allowed, note)
    frames = None
    if kind == "i2v":
        frames = r.count_4n1(table, "frames", "video.frames", d.DEFAULT_FRAMES, *d.FRAMES_RANGE)
    # Animate plays back at the rate its driving frames were sampled, so motion keeps its speed;
    # with preprocess_fps = -1 that rate is the video's own, known only to preprocessing (None).
    default_fps: int | None = d.DEFAULT_FPS[kind]
    if animate is not None:
        default_fps = animate.preprocess_fps if animate.preprocess_fps > 0 else None
    fps = r.integer(table, "fps", "video.fps", -1, *d.FPS_RANGE)
    fps = default_fps if fps == -1 else fps
    return VideoSettings(size=size, fps=fps, frames=frames)


def _sampling(r: Reader, table: dict, kind: str) -> SamplingSettings:
    r.unknown_keys(table, "sampling.", SAMPLING_KEYS, kind, TABLE_HINTS, REASONS)
    steps = r.integer(table, "steps", "sampling.steps", d.DEFAULT_STEPS[kind], *d.STEPS_RANGE)
    shift = r.number(table, "shift", "sampling.shift", d.DEFAULT_SHIFT, *d.SHIFT_RANGE, low_open=True)
    guide = _guide_scale(r, table, kind)
    solver, timesteps = _solver(r, table)
    if timesteps is not None:
        if "steps" in table and steps != len(timesteps):
            r.error("sampling.steps", table["steps"],
                    f"{len(timesteps)} (the length of sampling.timesteps), or leave steps out")
        steps = len(timesteps)
    seed: int | None = r.integer(table, "seed", "sampling.seed", -1, *d.SEED_RANGE)
    seed = None if seed == -1 else seed  # left out (or wrong, and reported): drawn at acceptance
    boundary = None
    if kind == "i2v":
        boundary = r.number(table, "boundary", "sampling.boundary", d.DEFAULT_BOUNDARY,
                            *d.BOUNDARY_RANGE, low_open=True, high_open=True)
    return SamplingSettings(steps=steps, shift=shift, guide_scale=guide, solver=solver, seed=seed,
                            boundary=boundary, timesteps=timesteps)


def _guide_scale(r: Reader, table: dict, kind: str) -> float | tuple[float, float]:
    default = d.DEFAULT_GUIDE[kind]
    value = table.get("guide_scale", MISSING)
    if value is MISSING:
        return default
    low, high = d.GUIDE_RANGE
    in_range = [is_number(v) and low <= v <= high for v in (value if isinstance(value, list) else [value])]
    if kind == "i2v":
        if isinstance(value, list) and len(value) == 2 and all(in_range):
            return (float(value[0]), float(value[1]))
        if not isinstance(value, list) and all(in_range):
            return (float(value), float(value))
        r.error("sampling.guide_scale", value,
                f"a number from {low:g} to {high:g}, or [low_noise, high_noise] (two such numbers)")
        return default
    if isinstance(value, list) or not all(in_range):
        r.error("sampling.guide_scale", value,
                f"one number from {low:g} to {high:g} (animate has one model; 1.0 turns guidance off)")
        return default
    return float(value)


def _solver(r: Reader, table: dict) -> tuple[str, tuple[int, ...] | None]:
    solver = r.choice(table, "solver", "sampling.solver", d.DEFAULT_SOLVER, d.SOLVERS)
    raw = table.get("timesteps", MISSING)
    if table.get("solver", solver) != solver:
        return solver, None  # the solver is wrong (reported): whether timesteps fit it is unknowable
    if solver == "euler" and raw is MISSING:
        r.error("sampling.solver", "euler",
                '"unipc" or "dpm++"; "euler" only together with sampling.timesteps = [...]')
        return d.DEFAULT_SOLVER, None
    if raw is MISSING:
        return solver, None
    if solver != "euler":
        r.error("sampling.timesteps", raw,
                f'no timesteps with solver = "{solver}" (explicit timesteps need solver = "euler")')
        return solver, None
    low, high = d.TIMESTEP_RANGE
    ok = (isinstance(raw, list) and 0 < len(raw) <= d.STEPS_RANGE[1]
          and all(is_int(t) and low <= t <= high for t in raw)
          and all(a > b for a, b in itertools.pairwise(raw)))
    if not ok:
        r.error("sampling.timesteps", raw,
                f"a list of 1 to {d.STEPS_RANGE[1]} whole numbers from {high} down to {low}, strictly "
                "decreasing, e.g. [1000, 750, 500, 250]")
        return solver, None
    return solver, tuple(raw)


def _animate(r: Reader, table: dict) -> AnimateSettings:
    r.unknown_keys(table, "animate.", ANIMATE_KEYS, "animate", TABLE_HINTS, REASONS)
    mode = r.choice(table, "mode", "animate.mode", "animation", d.ANIMATE_MODES)
    refert = table.get("refert_num", 1)
    if refert not in d.REFERT_NUMS or not is_int(refert):
        r.error("animate.refert_num", refert, "1 or 5 (frames carried over from one clip to the next)")
        refert = 1
    clip_len = r.count_4n1(table, "clip_len", "animate.clip_len", d.DEFAULT_CLIP_LEN, *d.CLIP_LEN_RANGE)
    if clip_len < refert + 4:
        r.error("animate.clip_len", clip_len,
                f"at least refert_num + 4 = {refert + 4} (each clip must add new frames)")
    retarget = r.boolean(table, "retarget", "animate.retarget", False)
    if retarget and mode == "replacement":
        r.error("animate.retarget", True,
                'false with mode = "replacement" (retargeting only applies to mode = "animation")')
        retarget = False
    relight = r.boolean(table, "relighting_lora", "animate.relighting_lora", False)
    fps = table.get("preprocess_fps", d.DEFAULT_PREPROCESS_FPS)
    low, high = d.PREPROCESS_FPS_RANGE
    if not is_int(fps) or not (fps == -1 or low <= fps <= high):
        r.error("animate.preprocess_fps", fps, f"a whole number from {low} to {high}, or -1 for the video's own fps")
        fps = d.DEFAULT_PREPROCESS_FPS
    return AnimateSettings(mode=mode, refert_num=refert, clip_len=clip_len, retarget=retarget,
                           relighting_lora=relight, preprocess_fps=fps)
