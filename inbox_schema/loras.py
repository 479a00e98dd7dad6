"""The manifest's [[lora]] entries: a file from the server's LoRA library (`<models>/loras/`, confined there) or
uploaded with the job, its strength, and the expert it goes on; each entry checked once, here.

Reads manifest values and, when the library is known, where a library name leads (resolve/stat only); it must not
open or hash LoRA files (pipeline.lora reads them in the pool, the daemon hashes them at acceptance).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from inbox_schema.errors import MISSING
from inbox_schema.job import LIBRARY, UPLOAD, LoraEntry
from inbox_schema.kinds import Kind
from inbox_schema.paths import on_disk_problem, relpath_problem
from inbox_schema.reader import Reader, is_int, is_number

LIBRARY_FOLDER = "loras"  # the library is <models>/loras/
MAX_LORAS = 8
STRENGTH_RANGE = (-5.0, 5.0)
SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")  # what pipeline.lora reads
EXPERTS = ("high_noise", "low_noise")  # a two-expert kind's models, as pipeline.lora names them
BOTH = "both"
KEYS = ("library", "path", "strength", "expert", "sha256", "size")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SHAPE = ('a table under [[lora]] with library = "name.safetensors" (a file in the server\'s LoRA library) or '
          'path = "loras/style.safetensors" (uploaded beside the manifest), and strength')


def read_loras(r: Reader, data: dict, kind: Kind, inbox_root: Path, below: PurePosixPath, check_inputs: bool,
               library: Path | None) -> tuple[LoraEntry, ...]:
    """Every [[lora]] entry, problems reported through `r`. Uploads are relative to the manifest's folder, `below`
    the (resolved) `inbox_root`; `library` is the LoRA library when known (else names are checked as text only,
    and the daemon checks them against its library)."""
    value = data.get("lora", MISSING)
    if value is MISSING:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        r.error("lora", value, _SHAPE + " (one [[lora]] table per LoRA)")
        return ()
    if len(value) > MAX_LORAS:
        r.error("lora", f"{len(value)} entries", f"at most {MAX_LORAS} LoRAs per job")
        return ()
    entries = [_entry(r, i, item, kind, inbox_root, below, check_inputs, library) for i, item in enumerate(value)]
    return tuple(entry for entry in entries if entry is not None)


def _entry(r: Reader, i: int, item: dict, kind: Kind, inbox_root: Path, below: PurePosixPath, check_inputs: bool,
           library: Path | None) -> LoraEntry | None:
    where = f"lora[{i}]"
    _unknown_keys(r, where, item, kind)
    strength = _strength(r, where, item)
    experts = _experts(r, where, item, kind)
    sha256 = item.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        r.error(f"{where}.sha256", sha256, "64 hexadecimal characters (the output of sha256sum)")
        sha256 = None
    sha256 = sha256.lower() if sha256 else None
    has_library, has_path = "library" in item, "path" in item
    if has_library == has_path:
        both = "either library = \"...\" (the LoRA library) or path = \"...\" (an upload), not both"
        r.error(where, item, both if has_library else _SHAPE)
        return None
    if has_library:
        if "size" in item:
            r.error(f"{where}.size", item["size"], "no size for a library file (size checks an upload)")
        name = item["library"]
        problem = library_name_problem(name) or (library_problem(library, name) if library is not None else None)
        if problem:
            r.error(f"{where}.library", name, problem)
            return None
        path = library / name if library is not None else None
        return LoraEntry(LIBRARY, name, strength, experts, path, sha256)
    relpath, size = item["path"], item.get("size")
    if size is not None and not (is_int(size) and size > 0):
        r.error(f"{where}.size", size, "the file size in bytes, a whole number above 0")
        size = None
    problem = _upload_problem(relpath, inbox_root, below, check_inputs)
    if problem:
        r.error(f"{where}.path", relpath, problem)
        return None
    path = inbox_root.joinpath(*below.parts, *PurePosixPath(relpath).parts)
    return LoraEntry(UPLOAD, relpath, strength, experts, path, sha256, size)


def _unknown_keys(r: Reader, where: str, item: dict, kind: Kind) -> None:
    for key, value in item.items():
        if key == "expert" and kind.experts == 1:
            r.error(f"{where}.expert", value, f"no expert with kind = \"{kind.name}\": it has one model, which every "
                                              "LoRA of the job goes on (leave expert out)")
        elif key not in KEYS:
            r.error(f"{where}.{key}", value, f"a key of [[lora]] ({', '.join(KEYS)})")


def _strength(r: Reader, where: str, item: dict) -> float:
    value = item.get("strength", 1.0)
    low, high = STRENGTH_RANGE
    if not is_number(value) or not low <= value <= high or value == 0:
        r.error(f"{where}.strength", value, f"a number from {low:g} to {high:g}, not 0 (usually 0.5 to 1.5; 1 "
                                            "for distillation LoRAs)")
        return 1.0
    return float(value)


def _experts(r: Reader, where: str, item: dict, kind: Kind) -> tuple[str, ...]:
    if kind.experts == 1:
        return ()
    value = item.get("expert", BOTH)
    choices = (*EXPERTS, BOTH)
    if value not in choices:
        listed = ", ".join(f'"{c}"' for c in choices)
        r.error(f"{where}.expert", value, f"one of {listed} (which of {kind.name}'s experts the LoRA goes on)")
        return EXPERTS
    return EXPERTS if value == BOTH else (value,)


def library_name_problem(name: object) -> str | None:
    """Why `name` (as written) cannot name a file of the LoRA library (finishes "expected ..."), or None."""
    plain = (f'the name of a file in the server\'s LoRA library (<models>/{LIBRARY_FOLDER}/), e.g. '
             '"style.safetensors" or "lightning/high_noise_model.safetensors"')
    if not isinstance(name, str) or not name.strip():
        return plain
    if "\\" in name or re.match(r"^[A-Za-z]:", name) or re.search(r"[\x00-\x1f\x7f]", name):
        return plain + ' (with "/" between folders, no backslashes, drive letters or control characters)'
    if name.startswith(("/", "~")):
        return plain + ", not an absolute path: library files are named relative to the library"
    parts = PurePosixPath(name).parts
    if ".." in parts or any(part.startswith(".") for part in parts):
        return plain + ', without ".." or hidden names (the name must stay inside the library)'
    if not name.lower().endswith(SUFFIXES):
        return plain + f" ({', '.join(SUFFIXES)})"
    return None


def library_problem(library: Path, name: str) -> str | None:
    """Why the library has no usable file `name`: missing, a folder, or (through a symbolic link) outside the
    library; None when it is a file inside it. Checked at validation and again by the pool before use."""
    root = Path(os.path.abspath(library))
    path = root.joinpath(*PurePosixPath(name).parts)
    try:
        return _library_file_problem(root, path, name)
    except (OSError, RuntimeError) as exc:  # a name too long for the filesystem, a symbolic link loop
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"a file in the LoRA library {root}, but {name[:80]} cannot be looked up ({why})"


def _library_file_problem(root: Path, path: Path, name: str) -> str | None:
    if not path.exists():
        have = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in SUFFIXES
                      and p.is_file())[:8] if root.is_dir() else []
        listed = f"; it has {', '.join(have)}" if have else (" (empty)" if root.is_dir() else " (no such folder)")
        return f"a file in the LoRA library {root}, but there is none of that name{listed}"
    resolved, real_root = path.resolve(), root.resolve()
    if not resolved.is_relative_to(real_root):
        return f"a file inside the LoRA library {root}, but {name} leads to {resolved}, outside it (symbolic link)"
    if not resolved.is_file():
        return f"a file in the LoRA library {root}, but {name} is a folder or special file"
    return None


def _upload_problem(relpath: object, inbox_root: Path, below: PurePosixPath, check_inputs: bool) -> str | None:
    if not isinstance(relpath, str):
        return 'the LoRA file\'s path relative to the manifest, e.g. path = "loras/style.safetensors"'
    problem = relpath_problem(relpath)
    if problem:
        return problem
    if not relpath.lower().endswith(SUFFIXES):
        return f"a LoRA file ({', '.join(SUFFIXES)})"
    if check_inputs:
        return on_disk_problem(inbox_root, below.parts + PurePosixPath(relpath).parts)
    return None
