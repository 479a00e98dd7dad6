"""The manifest's keys: which table has which key for which kind, and the hints for misplaced or foreign keys.

Derived from the kind registry each time (a registered kind brings its keys along); it must not validate values.
"""

from __future__ import annotations

from dataclasses import dataclass

from inbox_schema.kinds import Kind, kinds

COMMON_TOP_KEYS = ("schema", "kind", "name", "priority", "prompt", "negative_prompt", "inputs", "video",
                   "sampling", "notify", "lora")
NOTIFY_KEYS = ("urls", "events")
VIDEO_KEYS = ("size", "frames", "fps")
SAMPLING_KEYS = ("steps", "shift", "guide_scale", "solver", "seed", "boundary", "timesteps", "preset")
INPUT_TABLE_KEYS = ("path", "sha256", "size")

Owners = dict[str, tuple[str, ...]]  # key -> the kinds that have it


@dataclass(frozen=True)
class Vocabulary:
    """Per table prefix ("" = top level, "video.", "inputs.", "animate.", ...): key -> kinds that have it."""

    tables: dict[str, Owners]
    top_hints: dict[str, str]  # a key at the top level that belongs in a table: where
    table_hints: dict[str, str]  # a key in a table that belongs elsewhere: where

    def keys(self, prefix: str) -> Owners:
        return self.tables[prefix]

    def reasons(self, kind: Kind) -> dict[str, str]:
        """Why a field of other kinds does not apply to `kind` (by dotted field), shown after the error."""
        registry = kinds()
        found = {f"inputs.{role}": f" ({kind.name} takes {' and '.join('inputs.' + r for r in kind.roles)})"
                 for role in self.tables["inputs."] if role not in kind.roles}
        if not kind.frames and kind.length_note:
            found["video.frames"] = f" ({kind.length_note})"
        if kind.experts == 1:
            found["sampling.boundary"] = f" ({kind.name} has one model, no expert switch)"
        for table, owners in self.tables[""].items():
            if kind.name not in owners and owners and owners[0] in registry:
                owner = registry[owners[0]]
                found[table] = f' (set kind = "{owner.name}" to {owner.purpose})'
        return found


def vocabulary() -> Vocabulary:
    """The manifest's vocabulary for the kinds registered now."""
    registry = kinds()
    every = tuple(registry)
    top: Owners = dict.fromkeys(COMMON_TOP_KEYS, every)
    video: Owners = {key: every for key in VIDEO_KEYS}
    video["frames"] = tuple(k.name for k in registry.values() if k.frames)
    sampling: Owners = {key: every for key in SAMPLING_KEYS}
    sampling["boundary"] = tuple(k.name for k in registry.values() if k.experts == 2)
    inputs: Owners = {}
    option_tables: dict[str, Owners] = {}
    for kind in registry.values():
        for role in kind.roles:
            inputs[role] = (*inputs.get(role, ()), kind.name)
        if kind.options is not None:
            top[kind.options.table] = (*top.get(kind.options.table, ()), kind.name)
            owned = option_tables.setdefault(kind.options.table + ".", {})
            for key in kind.options.keys:
                owned[key] = (*owned.get(key, ()), kind.name)
    notify: Owners = {key: every for key in NOTIFY_KEYS}
    tables = {"": top, "video.": video, "sampling.": sampling, **option_tables, "notify.": notify, "inputs.": inputs}
    return Vocabulary(tables, *_hints(tables))


def _hints(tables: dict[str, Owners]) -> tuple[dict[str, str], dict[str, str]]:
    # Where a key that landed in the wrong table belongs. A top-level key written below a [table] header
    # belongs to that table in TOML, the most common manifest mistake.
    table_of = {key: prefix.rstrip(".") for prefix, owners in tables.items() if prefix for key in owners}
    top_hints = {key: f'; did you mean "{table}.{key}"? (put it under [{table}])' for key, table in table_of.items()}
    table_hints = {**{key: f'; did you mean "{table}.{key}"?' for key, table in table_of.items()},
                   **{key: f'; "{key}" is a top-level key: move it above the first [table] line' for key in tables[""]}}
    return top_hints, table_hints
