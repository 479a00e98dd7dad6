"""Manifest problems as values a person can act on: field, value, what was expected, where.

Renders them the same way everywhere (CLI, log, error.txt); it must not decide what the daemon does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


class _Missing:
    """The value of a field that the manifest does not have."""

    def __repr__(self) -> str:
        return "(missing)"

    def __reduce__(self) -> str:
        return "MISSING"  # unpickles as the module's singleton, so `is MISSING` keeps working


MISSING = _Missing()
MAX_SHOWN = 200  # characters of a table or array shown in an error: enough to recognise it


def readable(text: str) -> str:
    """`text` as UTF-8-safe text: a file name's undecodable bytes (surrogate escapes) shown as \\xNN, so that
    error.txt, the log and the ledger can always write it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)


def render_value(value: object) -> str:
    """Write a value the way it looks in TOML, so users recognise what they typed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 80 else value[:77] + "..."
        return json.dumps(readable(shown), ensure_ascii=False)
    if isinstance(value, (dict, list, tuple)):
        # A huge array or table (a manifest may hold 256 KiB of one) is shown by its start, not in full.
        if isinstance(value, dict):
            shown = "{ " + ", ".join(f"{k} = {render_value(v)}" for k, v in value.items()) + " }"
        else:
            shown = "[" + ", ".join(render_value(v) for v in value) + "]"
        return shown if len(shown) <= MAX_SHOWN else f"{shown[: MAX_SHOWN - 3]}... ({len(value)} entries)"
    return str(value)  # numbers, and TOML dates and times as TOML writes them


@dataclass(frozen=True)
class ManifestError:
    """One problem: `field` is the dotted TOML path, `expected` finishes the sentence "expected ..."."""

    field: str
    value: object
    expected: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.line is not None:
            where = f" (line {self.line}" + (f", column {self.column})" if self.column else ")")
        if self.value is MISSING:
            return f"{self.field} is missing: expected {self.expected}{where}"
        return f"{self.field} = {render_value(self.value)}: expected {self.expected}{where}"

    def to_dict(self) -> dict[str, object]:
        value = None if self.value is MISSING else readable(self.value) if isinstance(self.value, str) else self.value
        return {"field": self.field, "value": value, "missing": self.value is MISSING,
                "expected": self.expected, "line": self.line, "message": str(self)}


class ManifestInvalid(Exception):
    """A manifest with at least one problem; carries all of them, not just the first."""

    def __init__(self, errors: Sequence[ManifestError], source_name: str = "manifest") -> None:
        self.errors: list[ManifestError] = list(errors)
        self.source_name = readable(source_name)
        super().__init__(self.__str__())

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the error list when sent between processes (the default would rebuild it from the text).
        return (ManifestInvalid, (self.errors, self.source_name))

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{self.source_name}: {count} problem{'s' if count != 1 else ''}"
        return "\n".join([head, *(f"  {error}" for error in self.errors)])


RESUBMIT_HELP = """\
How to resubmit:
  1. Fix the manifest (check it first with `wanbox validate FILE`).
  2. Copy the media into the inbox first and the manifest last: the manifest is what starts a job,
     so a manifest that arrives before its media waits, and one whose media never arrive is rejected.
     Upload under a temporary name (a leading dot, or .part / .tmp) and rename when complete.
  3. Or let `wanbox submit FILE` do both steps in the right order.
The files of this job are kept next to this file; nothing was deleted."""


def render_errors(problems: Sequence[ManifestError | str], source_name: str) -> str:
    """The text of error.txt: every problem on its own line, then how to resubmit."""
    count = len(problems)
    source_name = readable(source_name)
    lines = [f"wanbox could not accept {source_name}: {count} problem{'s' if count != 1 else ''}.", ""]
    lines += [f"  * {readable(str(problem))}" for problem in problems]
    lines += ["", RESUBMIT_HELP, ""]
    return "\n".join(lines)
