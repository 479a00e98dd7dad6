"""Typed reads of one manifest table that collect every problem instead of stopping at the first.

Each read returns a usable value (the default when the manifest's value is wrong) so validation
can go on; it must not know what the fields mean beyond their type and bounds.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

from inbox_schema.errors import MISSING, ManifestError
from inbox_schema.lines import KeyLines


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def nearest_4n1(value: int, low: int, high: int) -> int:
    """The 4n+1 count closest to `value` inside [low, high], for "e.g." hints."""
    candidate = 4 * round((value - 1) / 4) + 1
    return min(max(candidate, low), high)


def suggest(key: str, known: Sequence[str]) -> str | None:
    """The known key a typo most likely meant (same key in other case first, then difflib)."""
    for name in known:
        if name.lower() == key.lower():
            return name
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


class Reader:
    """Collects ManifestErrors with their TOML line; the typed getters read one key each."""

    def __init__(self, lines: KeyLines) -> None:
        self.lines = lines
        self.errors: list[ManifestError] = []

    def error(self, field: str, value: object, expected: str) -> None:
        self.errors.append(ManifestError(field, value, expected, self.lines.line_of(field)))

    def table(self, data: dict, key: str, field: str) -> dict:
        """A sub-table, or {} (with an error) when the key holds something else."""
        value = data.get(key, {})
        if isinstance(value, dict):
            return value
        self.error(field, value, f"a table: write [{field}] on its own line, then its keys below it")
        return {}

    def integer(self, data: dict, key: str, field: str, default: int, low: int, high: int) -> int:
        value = data.get(key, MISSING)
        if value is MISSING:
            return default
        if not is_int(value) or not low <= value <= high:  # type: ignore[operator]
            self.error(field, value, f"a whole number from {low} to {high}")
            return default
        return value  # type: ignore[return-value]

    def count_4n1(self, data: dict, key: str, field: str, default: int, low: int, high: int) -> int:
        """A frame count of the form 4n+1 inside [low, high]."""
        value = data.get(key, MISSING)
        if value is MISSING:
            return default
        if not is_int(value):
            self.error(field, value, f"a whole number of the form 4n+1 from {low} to {high} (e.g. {default})")
        elif not low <= value <= high:  # type: ignore[operator]
            self.error(field, value, f"4n+1 from {low} to {high} (e.g. {nearest_4n1(value, low, high)})")  # type: ignore[arg-type]
        elif value % 4 != 1:  # type: ignore[operator]
            self.error(field, value, f"4n+1 (e.g. {nearest_4n1(value, low, high)})")  # type: ignore[arg-type]
        else:
            return value  # type: ignore[return-value]
        return default

    def number(self, data: dict, key: str, field: str, default: float, low: float, high: float,
               low_open: bool = False, high_open: bool = False) -> float:
        value = data.get(key, MISSING)
        if value is MISSING:
            return default
        above = is_number(value) and (value > low if low_open else value >= low)  # type: ignore[operator]
        below = is_number(value) and (value < high if high_open else value <= high)  # type: ignore[operator]
        if not (above and below):
            low_word = "above" if low_open else "from"
            high_word = "below" if high_open else "up to"
            self.error(field, value, f"a number {low_word} {low:g} {high_word} {high:g}")
            return default
        return float(value)  # type: ignore[arg-type]

    def boolean(self, data: dict, key: str, field: str, default: bool) -> bool:
        value = data.get(key, MISSING)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.error(field, value, "true or false (without quotes)")
            return default
        return value

    def choice(self, data: dict, key: str, field: str, default: str, allowed: Sequence[str],
               note: str = "") -> str:
        value = data.get(key, MISSING)
        if value is MISSING:
            return default
        if value not in allowed or not isinstance(value, str):
            listed = ", ".join(f'"{name}"' for name in allowed)
            hint = suggest(value, allowed) if isinstance(value, str) else None
            extra = f'; did you mean "{hint}"?' if hint else ""
            self.error(field, value, f"one of {listed}{note}{extra}")
            return default
        return value

    def text(self, data: dict, key: str, field: str, default: str | None, max_chars: int,
             omit_hint: str = "") -> str | None:
        """A non-empty string; `default` None means the key is required."""
        value = data.get(key, MISSING)
        if value is MISSING:
            if default is None:
                self.error(field, value, f"a non-empty string, e.g. {key} = \"...\"{omit_hint}")
            return default
        if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
            self.error(field, value, f"a non-empty string of at most {max_chars} characters{omit_hint}")
            return default
        return value

    def unknown_keys(self, data: dict, prefix: str, known: dict[str, tuple[str, ...]], kind: str,
                     hints: dict[str, str] | None = None, reasons: dict[str, str] | None = None) -> None:
        """Report keys this table does not have, and keys that belong to the other kind.

        `hints` says where a key that is unknown here belongs (by key); `reasons` why a field does
        not apply to the other kind (by dotted field).
        """
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        for key, value in data.items():
            field = prefix + key
            if key not in known:
                # An exact key of another table is a surer guess than a similar key of this one.
                elsewhere = (hints or {}).get(key)
                close = suggest(key, list(known))
                extra = elsewhere or (f'; did you mean "{close}"?' if close else "")
                self.error(field, value, f"a key of {where} ({', '.join(known)}){extra}")
            elif kind not in known[key]:
                owner = " or ".join(f'kind = "{name}"' for name in known[key])
                reason = (reasons or {}).get(field, "")
                self.error(field, value, f"no {field} with kind = \"{kind}\": it is only for {owner}{reason}")
