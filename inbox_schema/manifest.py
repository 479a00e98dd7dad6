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
from inbox_schema.job import InputFile, Job, SamplingSettings, VideoSettings
from inbox_schema.kinds import InputRole, Kind, kinds
from inbox_schema.lines import KeyLines
from inbox_schema.loras import read_loras
from inbox_schema.notify import read_notify
from inbox_schema.paths import on_disk_problem, relative_base, relpath_problem
from inbox_schema.presets import with_preset
from inbox_schema.reader import Reader, is_int, is_number
from inbox_schema.vocabulary import INPUT_TABLE_KEYS, Vocabulary, vocabulary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(d.NAME_PATTERN)
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)|\s*\(at end of document\)")


def load_manifest(path: Path, inbox_root: Path | None = None, check_inputs: bool = True,
                  lora_library: Path | None = None) -> Job:
    """Read, parse and validate the manifest at `path`; raises ManifestInvalid listing every problem."""
    path = Path(path)
    text = _read_text(path)
    return parse_manifest_text(text, path.name, path.parent, inbox_root, check_inputs=check_inputs,
                               lora_library=lora_library)


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
                        check_inputs: bool = True, lora_library: Path | None = None) -> Job:
    """Validate manifest text; `source_name` is the file name (it gives the default job name).

    Input paths are relative to `base_dir` and confined to `inbox_root` (default: `base_dir`).
    With `check_inputs`, inputs that exist are also checked on disk (no symlinks, regular files).
    `lora_library`: the server's LoRA library; [[lora]] library names must be files inside it (None: names are
    checked as text only, their files when the daemon accepts the job).
    """
    text = text.removeprefix("\ufeff")  # a byte-order mark from Windows editors is not content
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestInvalid([_syntax_error(exc, text)], source_name) from exc
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ManifestInvalid([ManifestError("toml", "arrays or inline tables nested hundreds of levels deep",
                                             "valid TOML that nests arrays and inline tables a few levels deep")],
                              source_name) from None
    reader = Reader(KeyLines(text))
    job = _build_job(reader, data, source_name, Path(base_dir), inbox_root, check_inputs, lora_library)
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
               check_inputs: bool, lora_library: Path | None) -> Job | None:
    if not _schema_ok(r, data):
        return None
    registry = kinds()
    words = vocabulary()
    kind_name = r.choice(data, "kind", "kind", "", tuple(registry))
    if "kind" not in data:
        r.error("kind", MISSING, " or ".join(f'kind = "{name}"' for name in registry))
    name = _name(r, data, source_name, base_dir)
    priority = r.integer(data, "priority", "priority", 0, *d.PRIORITY_RANGE)
    if kind_name not in registry:
        # Typos are still reported; the checks that depend on the kind wait for a valid kind.
        first = next(iter(registry))
        r.unknown_keys(data, "", dict.fromkeys(words.keys(""), tuple(registry)), first, words.top_hints)
        return None
    kind = registry[kind_name]
    reasons = words.reasons(kind)
    r.unknown_keys(data, "", words.keys(""), kind.name, words.top_hints, reasons)
    options = _options(r, data, kind, words, reasons)
    inputs = _inputs(r, data, kind, words, reasons, base_dir, inbox_root, check_inputs)
    root = Path(inbox_root) if inbox_root is not None else base_dir
    loras = read_loras(r, data, kind, root.resolve(), relative_base(base_dir, root) or PurePosixPath(), check_inputs,
                       lora_library)
    video = _video(r, r.table(data, "video", "video"), kind, words, reasons, options)
    sampling = _sampling(r, r.table(data, "sampling", "sampling"), kind, words, reasons)
    notify_table = r.table(data, "notify", "notify")
    r.unknown_keys(notify_table, "notify.", words.keys("notify."), kind.name, words.table_hints, reasons)
    notify = read_notify(r, notify_table)
    prompt = r.text(data, "prompt", "prompt", kind.default_prompt, d.PROMPT_MAX_CHARS)
    negative = r.text(data, "negative_prompt", "negative_prompt", d.DEFAULT_NEGATIVE_PROMPT,
                      d.PROMPT_MAX_CHARS, " (leave the key out to use the reference's default)")
    return Job(schema=d.SCHEMA_VERSION, kind=kind.name, name=name, priority=priority, prompt=prompt or "",
               negative_prompt=negative or "", inputs=inputs, video=video, sampling=sampling, options=options,
               notify=notify, loras=loras)


def _options(r: Reader, data: dict, kind: Kind, words: Vocabulary, reasons: dict[str, str]) -> object:
    """The kind's own table (e.g. [animate]), read by the reader its registry entry names."""
    if kind.options is None:
        return None
    name = kind.options.table
    table = r.table(data, name, name)
    r.unknown_keys(table, name + ".", words.keys(name + "."), kind.name, words.table_hints, reasons)
    return kind.options.read(r, table)


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


def _inputs(r: Reader, data: dict, kind: Kind, words: Vocabulary, reasons: dict[str, str], base_dir: Path,
            inbox_root: Path | None, check_inputs: bool) -> dict[str, InputFile]:
    table = r.table(data, "inputs", "inputs")
    r.unknown_keys(table, "inputs.", words.keys("inputs."), kind.name, words.table_hints, reasons)
    root = Path(inbox_root) if inbox_root is not None else base_dir
    below = relative_base(base_dir, root)
    if below is None:
        r.error("manifest", str(base_dir), f"a manifest inside the inbox {root}")
        below = PurePosixPath()
    found: dict[str, InputFile] = {}
    for role in kind.inputs:
        item = _input(r, table, role, root.resolve() / below, below, root, check_inputs)
        if item is not None:
            found[role.name] = item
    return found


def _input(r: Reader, table: dict, role: InputRole, folder: Path, below: PurePosixPath, root: Path,
           check_inputs: bool) -> InputFile | None:
    field = f"inputs.{role.name}"
    value = table.get(role.name, MISSING)
    shape = f'a path like {role.name} = "{role.example}", or a table with path, sha256 and size'
    if value is MISSING:
        r.error(field, value, f'{shape} under [inputs] (the {role.name} this job needs)')
        return None
    if isinstance(value, dict):
        r.unknown_keys(value, field + ".", dict.fromkeys(INPUT_TABLE_KEYS, ("any",)), "any")
        return _input_entry(r, value, role, folder, below, root, check_inputs)
    if not isinstance(value, str):
        r.error(field, value, shape)
        return None
    return _input_entry(r, {"path": value}, role, folder, below, root, check_inputs, field)


def _input_entry(r: Reader, entry: dict, role: InputRole, folder: Path, below: PurePosixPath, root: Path,
                 check_inputs: bool, path_field: str | None = None) -> InputFile | None:
    field = f"inputs.{role.name}"
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
    return InputFile(role=role.name, path=folder.joinpath(*parts), relpath=relpath,
                     sha256=sha256.lower() if sha256 else None, size=size)


def _relpath_ok(r: Reader, field: str, relpath: object, role: InputRole) -> bool:
    if relpath is MISSING or not isinstance(relpath, str):
        r.error(field, relpath, 'the file\'s path relative to the manifest, e.g. path = "media/cat.jpg"')
        return False
    problem = relpath_problem(relpath)
    if problem:
        r.error(field, relpath, problem)
        return False
    suffixes = d.MEDIA_SUFFIXES[role.media]
    if not relpath.lower().endswith(suffixes):
        what = "a video" if role.media == "video" else "an image"
        r.error(field, relpath, f"{what} file ({', '.join(suffixes)})")
        return False
    return True


def _video(r: Reader, table: dict, kind: Kind, words: Vocabulary, reasons: dict[str, str],
           options: object) -> VideoSettings:
    r.unknown_keys(table, "video.", words.keys("video."), kind.name, words.table_hints, reasons)
    others = [k for k in kinds().values() if any(size not in kind.sizes for size in k.sizes)]
    note = ""
    if others:
        extra = list(dict.fromkeys(size for k in others for size in k.sizes if size not in kind.sizes))
        owners = " and ".join(k.name for k in others)
        note = f' for kind = "{kind.name}" ({" and ".join(extra)} are {owners} only)'
    size = r.choice(table, "size", "video.size", kind.default_size, kind.sizes, note)
    frames = None
    if kind.frames:
        frames = r.count_4n1(table, "frames", "video.frames", d.DEFAULT_FRAMES, *d.FRAMES_RANGE)
    default_fps: int | None = kind.default_fps
    if kind.options is not None and kind.options.default_fps is not None:
        default_fps = kind.options.default_fps(options)
    fps = r.integer(table, "fps", "video.fps", -1, *d.FPS_RANGE)
    fps = default_fps if fps == -1 else fps
    return VideoSettings(size=size, fps=fps, frames=frames)


def _sampling(r: Reader, table: dict, kind: Kind, words: Vocabulary, reasons: dict[str, str]) -> SamplingSettings:
    r.unknown_keys(table, "sampling.", words.keys("sampling."), kind.name, words.table_hints, reasons)
    table, preset = with_preset(r, table, kind.name)  # the preset's values under the manifest's own
    steps = r.integer(table, "steps", "sampling.steps", kind.default_steps, *d.STEPS_RANGE)
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
    if kind.experts == 2:
        boundary = r.number(table, "boundary", "sampling.boundary", d.DEFAULT_BOUNDARY,
                            *d.BOUNDARY_RANGE, low_open=True, high_open=True)
    return SamplingSettings(steps=steps, shift=shift, guide_scale=guide, solver=solver, seed=seed,
                            boundary=boundary, timesteps=timesteps, preset=preset)


def _guide_scale(r: Reader, table: dict, kind: Kind) -> float | tuple[float, float]:
    default = kind.default_guide
    value = table.get("guide_scale", MISSING)
    if value is MISSING:
        return default
    low, high = d.GUIDE_RANGE
    above = kind.guide_above_zero

    def ok(v: object) -> bool:
        return is_number(v) and (low < v if above else low <= v) and v <= high  # type: ignore[operator]

    in_range = [ok(v) for v in (value if isinstance(value, list) else [value])]
    span = f"a number above {low:g} up to {high:g}" if above else f"a number from {low:g} to {high:g}"
    if kind.experts == 2:
        if isinstance(value, list) and len(value) == 2 and all(in_range):
            return (float(value[0]), float(value[1]))
        if not isinstance(value, list) and all(in_range):
            return (float(value), float(value))
        r.error("sampling.guide_scale", value, f"{span}, or [low_noise, high_noise] (two such numbers)")
        return default
    if isinstance(value, list) or not all(in_range):
        one = span.replace("a number", "one number", 1)
        r.error("sampling.guide_scale", value,
                f"{one} ({kind.name} has one model; 1.0 turns guidance off)")
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
