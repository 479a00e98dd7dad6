"""The kind registry: what a job kind is (model, inputs, defaults, preparation, pool family), one entry each.

Plain data and lookups. It must not import torch or the pipeline: the preparation function, the pool family
and the checkpoint layout are named as "module:attribute" and imported only where they run (`resolve`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inbox_schema.defaults import DEFAULT_SIZE

# Extra kinds, as modules that call `register` when imported ("pkg.kind_a,pkg.kind_b"): a site or a test
# can add a kind without editing wanbox. Every process that meets such a job (the supervisor, its CPU pool,
# the GPU pool) imports them, because each of them reads this variable.
PLUGINS_ENV = "WANBOX_KINDS"


@dataclass(frozen=True)
class InputRole:
    """One input file a kind needs: `inputs.<name>` in the manifest."""

    name: str
    media: str  # "image" or "video": which suffixes are accepted
    example: str  # shown in errors: image = "cat.jpg"


@dataclass(frozen=True)
class OptionsTable:
    """A kind's own manifest table (e.g. [animate]): its keys, its settings class and the reader that validates
    it (`read(reader, table) -> settings`, reporting problems through the reader, see inbox_schema.reader)."""

    table: str
    keys: tuple[str, ...]
    settings: type
    read: Callable[[Any, dict], Any]
    # The output's fps when the manifest leaves video.fps out, from the settings (None: known only after
    # preparation, e.g. a driving video's own rate); without it the kind's default_fps applies.
    default_fps: Callable[[Any], int | None] | None = None
    json_schema: Callable[[], dict] | None = None  # the table as JSON Schema, for editors


@dataclass(frozen=True)
class Kind:
    """Everything wanbox knows about one job kind. Adding a kind = one `register(Kind(...))` plus its modules."""

    name: str  # the manifest's kind = "..."
    model_id: str  # the model family the pool loads for it
    model_folder: str  # its folder under the models directory (the Hub repo's name)
    purpose: str  # finishes 'set kind = "<name>" to ...' in hints
    inputs: tuple[InputRole, ...]
    sizes: tuple[str, ...]  # the reference's size strings this kind accepts
    default_steps: int
    default_fps: int
    default_guide: float | tuple[float, float]
    prepare: str  # "module:function(job, work_dir, settings) -> Prepared", run in the CPU pool
    family: str  # "module:Class(args, ranks)", the warm pool's model family
    layout: str  # "module:NAME", the released checkpoint layout (pipeline.weights.layouts)
    experts: int = 1  # 2: a high- and a low-noise expert, guide_scale per expert and sampling.boundary
    guide_above_zero: bool = False  # guidance must be > 0 (the pipeline divides by it)
    default_prompt: str | None = None  # None: the manifest must give a prompt
    frames: bool = True  # whether video.frames applies (else the length follows an input)
    length_note: str = ""  # why video.frames does not apply, for the error
    options: OptionsTable | None = None
    default_size: str = DEFAULT_SIZE  # one of `sizes`
    outputs: tuple[tuple[str, str], ...] = ()  # delivered beside the video: (role, path in the work folder)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role.name for role in self.inputs)


_KINDS: dict[str, Kind] = {}
_plugins_loaded = False


def register(kind: Kind) -> Kind:
    """Add a kind (at import of the module that defines it); the same entry twice is fine, a clash is not."""
    if kind.default_size not in kind.sizes:
        raise ValueError(f"job kind {kind.name!r}: default_size {kind.default_size!r} is not one of its sizes")
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"job kind {kind.name!r} is registered twice with different entries")
    clash = next((k for k in _KINDS.values() if k.model_id == kind.model_id and k.name != kind.name), None)
    if clash is not None:
        raise ValueError(f"job kind {kind.name!r}: model {kind.model_id!r} already belongs to kind {clash.name!r}")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register a throwaway one)."""
    _KINDS.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


def kinds() -> dict[str, Kind]:
    """Every registered kind by name, built-in ones first."""
    _load_plugins()
    return dict(_KINDS)


def get_kind(name: str) -> Kind:
    found = kinds().get(name)
    if found is None:
        raise KeyError(f"unknown job kind {name!r}; known: {', '.join(kinds())}")
    return found


def kind_for_model(model_id: str) -> Kind:
    for kind in kinds().values():
        if kind.model_id == model_id:
            return kind
    raise KeyError(f"unknown model {model_id!r}; known: {', '.join(model_ids())}")


def model_ids() -> tuple[str, ...]:
    return tuple(kind.model_id for kind in kinds().values())


def model_folders() -> dict[str, str]:
    """model id -> its folder under the models directory."""
    return {kind.model_id: kind.model_folder for kind in kinds().values()}


def resolve(reference: str) -> Any:
    """The object a "module:attribute" reference names (imports the module)."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise ValueError(f"{reference!r}: expected 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)
