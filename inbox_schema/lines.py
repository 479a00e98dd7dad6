"""Finds the line of a dotted key in TOML source, because tomllib reports no positions.

A small line scan (table headers and `key =` lines), good enough for error messages; it must
never be used to read values.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_INLINE_KEY = re.compile(r"""[{,]\s*([A-Za-z0-9_-]+|"[^"]*")\s*=""")


def _split_dotted(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [part.strip("\"'") for part in parts]


class KeyLines:
    """Maps dotted paths like `video.frames` to 1-based line numbers of the source text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        self._arrays: dict[str, int] = {}  # [[name]] -> tables of that name seen so far
        self._scan(text)

    def _record(self, path: list[str], number: int) -> None:
        self.lines.setdefault(".".join(path), number)

    def _scan(self, text: str) -> None:
        table: list[str] = []
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                # Lines inside a multi-line string are text, not keys.
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header:
                table = _split_dotted(header.group(1))
                self._record(table, number)
                if line.lstrip().startswith("[["):  # the i-th table of an array: its keys are name[i].key
                    name = ".".join(table)
                    count = self._arrays[name] = self._arrays.get(name, -1) + 1
                    table = [*table[:-1], f"{table[-1]}[{count}]"]
                    self._record(table, number)
                continue
            key = _KEY.match(line)
            if not key:
                continue
            path = table + _split_dotted(key.group(1))
            self._record(path, number)
            rest = line[key.end():]
            for inner in _INLINE_KEY.finditer(rest):
                self._record(path + [inner.group(1).strip('"')], number)
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote

    def line_of(self, field: str) -> int | None:
        """The line of `field`, or of its nearest enclosing key or table when it has none itself."""
        for candidate in (field, re.sub(r"\[\d+\]", "", field)):  # lora[1].x, else the array's first line
            parts = candidate.split(".")
            while parts:
                found = self.lines.get(".".join(parts))
                if found is not None:
                    return found
                parts.pop()
        return None
