"""A seeded generator of hostile manifests, grown from the real examples (inbox_schema/examples) and the kinds'
fields: broken and valid TOML, wrong types, boundary values, unknown keys, odd names and paths, odd encodings.

Only makes cases (bytes plus where they go); the tests decide what must hold. The same seed gives the same cases.
"""

from __future__ import annotations

import math
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any

from inbox_schema import defaults as d
from inbox_schema.kinds import kinds
from inbox_schema.loras import KEYS as LORA_KEYS
from inbox_schema.vocabulary import INPUT_TABLE_KEYS, vocabulary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[2] / "inbox_schema" / "examples"
SEED_ENV = "WANBOX_FUZZ_SEED"
COUNT_ENV = "WANBOX_FUZZ_COUNT"
DEFAULT_SEED = 1515
DEFAULT_COUNT = 1200


@dataclass
class Case:
    """One fuzzed manifest: `relpath` inside the inbox ("x.toml" or "folder/job.toml") and its bytes."""

    index: int
    relpath: str
    data: bytes
    how: list[str] = field(default_factory=list)  # the mutations that made it, for a failure's message

    def describe(self) -> str:
        shown = self.data[:600] + (b"..." if len(self.data) > 600 else b"")
        return f"case {self.index} ({self.relpath}; {', '.join(self.how)}; {len(self.data)} bytes): {shown!r}"


# --- value pools: what a careless or hostile user may write -----------------------------------------------------

BIG = [2**31, 2**63 - 1, 2**63, -(2**63), 10**30]
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-300, 5e-324, 1e308, 0.5, 3.5, 20.0000001]
ODD_STRINGS = ["", " ", "\t", "x", "ü", "猫", "😺", "a\x00b", "\x7f", "line\nbreak", "\u202e", "\ufeff",
               "e\u0301", "null", "true", "1", "1.5", "x" * 10_001, "é" * 300]
PATHS = ["cat.jpg", "media/i2v_input.jpg", "hero.png", "dance.mp4", "猫.jpg", "/etc/passwd", "/cat.jpg",
         "../cat.jpg", "media/../../cat.jpg", "./cat.jpg", "~/cat.jpg", "C:\\cat.jpg", "c:cat.jpg",
         "media\\cat.jpg", "cat\x00.jpg", "cat.jpg\n", "", " ", ".cat.jpg", "cat.jpg.part", "cat.jpg~",
         "media/", "media", "cat.gif", "CAT.JPG", "x" * 300 + ".jpg", ("d/" * 200) + "cat.jpg",
         "link.jpg", "dirlink/cat.jpg", "dir.jpg", "pipe.jpg", "missing.jpg", "e\u0301.jpg", "cat .jpg"]
LORA_NAMES = ["style.safetensors", "sub/style.safetensors", "missing.safetensors", "escape.safetensors",
              "folder.safetensors", "../style.safetensors", "/abs/style.safetensors", "a/.hidden/x.safetensors",
              "style.txt", "", "style\x00.safetensors", "C:\\style.safetensors", "loras/style.safetensors",
              "x" * 300 + ".safetensors", "loop.safetensors", "dangling.safetensors", ("d/" * 300) + "x.safetensors"]
NAMES = ["ok-name", "Ok.name_2", "", "-dash", ".dot", "a b", "a/b", "..", "名前", "x" * 100, "x" * 101,
         "a\x00b", "CON", "9", "é"]
URLS = ["https://example.org/hook", "http://localhost:9/x", "ftp://example.org", "https://", "not a url",
        "http://[::1", "http://exa mple.org", "", "https://example.org/" + "x" * 5000]


def seed_and_count(env: dict[str, str]) -> tuple[int, int]:
    return int(env.get(SEED_ENV, DEFAULT_SEED)), int(env.get(COUNT_ENV, DEFAULT_COUNT))


def examples() -> list[tuple[str, str]]:
    """(relpath, text) of every shipped example manifest."""
    found = sorted(EXAMPLES.glob("*.toml")) + sorted(EXAMPLES.glob("*/job.toml"))
    return [(p.relative_to(EXAMPLES).as_posix(), p.read_text(encoding="utf-8")) for p in found]


def field_paths() -> list[tuple[str, ...]]:
    """Every (table, key) path the kinds know, e.g. ("video", "frames"), ("animate", "clip_len"), ("kind",)."""
    paths: list[tuple[str, ...]] = []
    for prefix, owners in vocabulary().tables.items():
        table = tuple(prefix.rstrip(".").split(".")) if prefix else ()
        paths += [(*table, key) for key in owners]
    paths += [("inputs", role, key) for kind in kinds().values() for role in kind.roles for key in INPUT_TABLE_KEYS]
    return paths


class Fuzzer:
    """`case(i)` makes case i; every random choice comes from one seeded Random, so a seed replays a run."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bases = examples()
        self.parsed = [(rel, text, tomllib.loads(text)) for rel, text in self.bases]
        self.paths = field_paths()
        self.structured: list[Callable[[dict, list[str]], None]] = [
            self.set_field, self.set_field, self.set_field, self.delete_field, self.unknown_key, self.swap_kind,
            self.set_inputs, self.set_name, self.set_loras, self.set_preset, self.set_notify, self.set_timesteps,
            self.huge_value,
        ]
        self.textual: list[Callable[[bytes, list[str]], bytes]] = [
            self.truncate, self.drop_line, self.duplicate_line, self.insert_junk, self.flip_byte, self.bom,
            self.crlf, self.reencode, self.deep_nesting, self.oversize, self.colon_for_equals, self.empty,
        ]

    # --- a case -----------------------------------------------------------------------------------------------

    def case(self, index: int) -> Case:
        rng = self.rng
        rel, text, data = rng.choice(self.parsed)
        how = [f"from {rel}"]
        mode = rng.random()
        if mode < 0.55:  # structured: change the parsed manifest, write it back as TOML
            table = _copy(data)
            for mutate in rng.sample(self.structured, rng.randint(1, 4)):
                mutate(table, how)
            raw = dumps(table).encode("utf-8", "surrogatepass")
            if rng.random() < 0.2:
                raw = rng.choice(self.textual)(raw, how)
        elif mode < 0.9:  # textual: break the bytes of the real file (comments and all)
            raw = text.encode("utf-8")
            for mutate in rng.sample(self.textual, rng.randint(1, 3)):
                raw = mutate(raw, how)
        else:
            raw = text.encode("utf-8")
            how.append("unchanged")
        return Case(index, self.place(index, rel, how), raw, how)

    def place(self, index: int, rel: str, how: list[str]) -> str:
        """Where the manifest goes: the base's layout, a plain file, or a folder, sometimes under an odd name."""
        odd = ["名前", "a b", "-x", "x" * 120, "e\u0301", "\udcff\udcfe", "ok.name"]  # \udcXX: non-UTF-8 bytes
        stem = f"case-{index:04d}"
        if self.rng.random() < 0.15:
            stem = f"{self.rng.choice(odd)}-{index}"
            how.append(f"named {stem!r}")
        folder = rel.endswith("/job.toml") if self.rng.random() < 0.8 else self.rng.random() < 0.5
        return f"{stem}/job.toml" if folder else f"{stem}.toml"

    # --- structured mutations -------------------------------------------------------------------------------

    def value(self, key: str = "") -> Any:
        """A value of any TOML type, biased towards the field's own boundaries."""
        rng = self.rng
        bounds = {"frames": d.FRAMES_RANGE, "fps": d.FPS_RANGE, "steps": d.STEPS_RANGE, "seed": d.SEED_RANGE,
                  "priority": d.PRIORITY_RANGE, "shift": d.SHIFT_RANGE, "guide_scale": d.GUIDE_RANGE,
                  "boundary": d.BOUNDARY_RANGE, "clip_len": (5, 161), "preprocess_fps": (1, 60),
                  "refert_num": (1, 5), "schema": (1, 1), "size": (1, 2**40), "strength": (-5, 5)}
        pick = rng.random()
        if key in bounds and pick < 0.45:
            low, high = bounds[key]
            choices: list[Any] = [low - 1, low, high, high + 1, -1, 0, (low + high) // 2]
            if isinstance(low, float) or key in ("shift", "guide_scale", "boundary", "strength"):
                choices += [float(low), float(high), low - 1e-9, high + 1e-9, math.nan, math.inf]
            if key == "frames" or key == "clip_len":
                choices += [4 * rng.randint(0, 45) + rng.choice([0, 1, 2, 3])]
            return rng.choice(choices)
        kinds_of_value: list[Callable[[], Any]] = [
            lambda: rng.choice([True, False]),
            lambda: rng.choice([0, 1, -1, *BIG, rng.randint(-1000, 1000)]),
            lambda: rng.choice(ODD_FLOATS),
            lambda: rng.choice(ODD_STRINGS + PATHS + NAMES + ["i2v", "animate", "832*480", "1280*720", "unipc",
                                                               "euler", "dpm++", "lightning-4step", "both"]),
            lambda: [self.value() for _ in range(rng.randint(0, 4))],
            lambda: {rng.choice(["path", "x", "sha256", "size", "mode"]): self.value() for _ in range(rng.randint(0, 3))},
            lambda: rng.choice([datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc), datetime(2024, 1, 2, 3, 4, 5),
                                date(1979, 5, 27), time(7, 32)]),
        ]
        return rng.choice(kinds_of_value)()

    def set_field(self, data: dict, how: list[str]) -> None:
        path = self.rng.choice(self.paths)
        value = self.value(path[-1])
        _put(data, path, value)
        how.append(f"{'.'.join(path)} = {_short(value)}")

    def delete_field(self, data: dict, how: list[str]) -> None:
        path = self.rng.choice(self.paths + [("inputs",), ("video",), ("sampling",), ("schema",), ("kind",)])
        if _drop(data, path):
            how.append(f"no {'.'.join(path)}")

    def unknown_key(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        known = self.rng.choice(self.paths)
        key = rng.choice([known[-1].upper(), known[-1] + "s", known[-1][:-1], "", " ", "ü", "a.b", "x\x00",
                          "[x]", "x" * 300, "prompt", "frames", "lora", "animate", "inputs"])
        table = rng.choice([(), ("video",), ("sampling",), ("inputs",), ("animate",), ("notify",), ("deep", "er")])
        _put(data, (*table, key), self.value())
        how.append(f"extra key {'.'.join((*table, repr(key)))}")

    def swap_kind(self, data: dict, how: list[str]) -> None:
        kind = self.rng.choice([*kinds(), "I2V", "t2v", "", 2])
        data["kind"] = kind
        how.append(f"kind = {kind!r}")

    def set_inputs(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        role = rng.choice(["image", "character", "video", "mask"])
        path = rng.choice(PATHS)
        shape = rng.random()
        if shape < 0.6:
            value: Any = path
        elif shape < 0.9:
            value = {"path": path}
            if rng.random() < 0.5:
                value["sha256"] = rng.choice(["0" * 64, "Z" * 64, "abc", 5, "a" * 65])
            if rng.random() < 0.5:
                value["size"] = rng.choice([0, -1, 1, 250628, 2**63, "5", 1.5])
        else:
            value = self.value()
        data.setdefault("inputs", {}) if isinstance(data.get("inputs"), dict) else data.update(inputs={})
        data["inputs"][role] = value
        how.append(f"inputs.{role} = {_short(value)}")

    def set_name(self, data: dict, how: list[str]) -> None:
        name = self.rng.choice(NAMES)
        data["name"] = name
        how.append(f"name = {name!r}")

    def set_loras(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        count = rng.choice([0, 1, 2, 2, 3, 8, 9, 40])
        entries = []
        for _ in range(count):
            entry: dict[str, Any] = {}
            source = rng.random()
            if source < 0.45:
                entry["library"] = rng.choice(LORA_NAMES)
            elif source < 0.9:
                entry["path"] = rng.choice(["loras/style.safetensors", *LORA_NAMES, *PATHS[:8]])
            else:
                entry["library"], entry["path"] = "style.safetensors", "loras/style.safetensors"
            for key in rng.sample([k for k in LORA_KEYS if k not in entry] + ["weight", "Strength"], rng.randint(0, 3)):
                entry[key] = rng.choice([self.value(key), 1.0, 0, -5, 5.0000001, "both", "high_noise", "low_noise",
                                         "0" * 64, 100])
            entries.append(entry)
        shape = rng.random()
        lora: Any = entries if shape < 0.85 else (entries[0] if entries and shape < 0.92 else self.value())
        data["lora"] = lora
        how.append(f"lora = {_short(lora)}")

    def set_preset(self, data: dict, how: list[str]) -> None:
        preset = self.rng.choice(["lightning-4step", "lightning-4step", "Lightning-4step", "", "nope", 4])
        sampling = data.setdefault("sampling", {}) if isinstance(data.get("sampling"), dict) else {}
        data["sampling"] = sampling
        sampling["preset"] = preset
        for key in self.rng.sample(["steps", "solver", "timesteps", "shift", "guide_scale"], self.rng.randint(0, 2)):
            sampling[key] = self.value(key)
        how.append(f"sampling = {_short(sampling)}")

    def set_notify(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        notify = {"urls": rng.choice([[rng.choice(URLS) for _ in range(rng.randint(0, 7))], "https://x.org", 5]),
                  "events": rng.choice([["done"], [], ["done", "done"], ["nope"], "done", ["failed", "rejected"]])}
        data["notify"] = notify
        how.append(f"notify = {_short(notify)}")

    def set_timesteps(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        steps = rng.choice([[1000, 750, 500, 250], [250, 500], [], [1000] * 2, list(range(1000, 0, -9)),
                            list(range(1000, 0, -10)), [1000.0, 500.0], [1001, 1], [1000, 0], ["1000"]])
        sampling = data.setdefault("sampling", {}) if isinstance(data.get("sampling"), dict) else {}
        data["sampling"] = sampling
        sampling["timesteps"] = steps
        if rng.random() < 0.7:
            sampling["solver"] = rng.choice(["euler", "unipc", "Euler"])
        how.append(f"timesteps of {len(steps)}, solver {sampling.get('solver')!r}")

    def huge_value(self, data: dict, how: list[str]) -> None:
        rng = self.rng
        big: Any = rng.choice([
            "x" * rng.choice([10_000, 10_001, 200_000]),
            list(range(rng.choice([1_000, 20_000]))),
            [[[[[1]]]]] * 50,
            {f"k{i}": i for i in range(2_000)},
        ])
        path = rng.choice([("prompt",), ("negative_prompt",), ("sampling", "timesteps"), ("video", "frames"),
                           ("inputs", "image"), ("notify", "urls"), ("name",), ("junk",)])
        _put(data, path, big)
        how.append(f"huge {'.'.join(path)} ({type(big).__name__})")

    # --- textual mutations ----------------------------------------------------------------------------------

    def truncate(self, raw: bytes, how: list[str]) -> bytes:
        cut = self.rng.randint(0, len(raw))
        how.append(f"cut at byte {cut}")
        return raw[:cut]

    def drop_line(self, raw: bytes, how: list[str]) -> bytes:
        lines = raw.split(b"\n")
        i = self.rng.randrange(len(lines))
        how.append(f"line {i + 1} removed")
        return b"\n".join(lines[:i] + lines[i + 1:])

    def duplicate_line(self, raw: bytes, how: list[str]) -> bytes:
        lines = raw.split(b"\n")
        i = self.rng.randrange(len(lines))
        how.append(f"line {i + 1} twice")
        return b"\n".join(lines[: i + 1] + lines[i:])

    def insert_junk(self, raw: bytes, how: list[str]) -> bytes:
        junk = self.rng.choice([b"\x00", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"[", b"]]", b"=", b'"', b"'''",
                                b'"""', b"\r", b"\n[[lora]]\n", b"\n[video]\n", b"\n[inputs]\nimage = 1\n", b"#",
                                b"\\", b"\\u0000", b"\t", b"\xe2\x80\xae", bytes(self.rng.randrange(256) for _ in range(8))])
        at = self.rng.randint(0, len(raw))
        how.append(f"{junk!r} at byte {at}")
        return raw[:at] + junk + raw[at:]

    def flip_byte(self, raw: bytes, how: list[str]) -> bytes:
        if not raw:
            return raw
        at = self.rng.randrange(len(raw))
        how.append(f"byte {at} flipped")
        return raw[:at] + bytes([raw[at] ^ (1 << self.rng.randrange(8))]) + raw[at + 1:]

    def bom(self, raw: bytes, how: list[str]) -> bytes:
        how.append("BOM")
        return self.rng.choice([b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe"]) + raw

    def crlf(self, raw: bytes, how: list[str]) -> bytes:
        ending = self.rng.choice([b"\r\n", b"\r", b"\n\r"])
        how.append(f"line endings {ending!r}")
        return raw.replace(b"\n", ending)

    def reencode(self, raw: bytes, how: list[str]) -> bytes:
        encoding = self.rng.choice(["utf-16", "utf-16-le", "latin-1", "utf-32", "cp1252"])
        how.append(f"encoded as {encoding}")
        return raw.decode("utf-8", "replace").encode(encoding, "replace")

    def deep_nesting(self, raw: bytes, how: list[str]) -> bytes:
        depth = self.rng.choice([30, 500, 5_000, 60_000])
        shape = self.rng.choice([b"[", b"{a="])
        close = b"]" if shape == b"[" else b"}"
        how.append(f"nested {depth} deep")
        return raw + b"\nnested = " + shape * depth + b"1" + close * depth + b"\n"

    def oversize(self, raw: bytes, how: list[str]) -> bytes:
        size = self.rng.choice([d.MANIFEST_MAX_BYTES - len(raw) - 1, d.MANIFEST_MAX_BYTES + 1, 2 * d.MANIFEST_MAX_BYTES])
        how.append(f"padded to {len(raw) + max(size, 0)} bytes")
        pad = b"#" + b"x" * max(size - 2, 0) + b"\n"
        return raw + pad[: max(size, 0)]

    def colon_for_equals(self, raw: bytes, how: list[str]) -> bytes:
        how.append("':' for '='")
        return raw.replace(b" = ", b": ", 1)

    def empty(self, raw: bytes, how: list[str]) -> bytes:
        made = self.rng.choice([b"", b" \n\t", b"\xef\xbb\xbf", b"\x00" * 16, b"schema = 1\n"])
        how.append(f"replaced by {made!r}")
        return made


# --- a small TOML writer (tomllib only reads): enough for every value the fuzzer makes ------------------------

_BARE = set(string.ascii_letters + string.digits + "_-")


def _key(key: str) -> str:
    return key if key and set(key) <= _BARE else _string(key)


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def dumps(data: dict) -> str:
    """TOML for a parsed manifest: scalars first, then [tables], then [[arrays of tables]]."""
    lines, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables:
        lines.append(f"\n[{_key(key)}]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in value.items()]
    for key, items in arrays:
        for item in items:
            lines.append(f"\n[[{_key(key)}]]")
            lines += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _put(data: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = value


def _drop(data: dict, path: tuple[str, ...]) -> bool:
    for key in path[:-1]:
        data = data.get(key)  # type: ignore[assignment]
        if not isinstance(data, dict):
            return False
    return data.pop(path[-1], None) is not None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
