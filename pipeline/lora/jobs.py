"""A job's LoRAs across a family's models (I2V: the experts `high_noise` / `low_noise`; Animate: one model):
bind every entry to the models it names, apply them per model by the chosen method, describe it for the
sidecar, and take it all away after the job.

Must not read manifests or pick files from a library (the job contract does) nor decide the method (method.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pipeline.lora.binding import BoundLora, bind_lora
from pipeline.lora.files import LoraFile
from pipeline.lora.hooks import LoraHooks, hook_loras
from pipeline.lora.merge import MergedLoras, PristineWeights, merge_loras
from pipeline.lora.method import Method

I2V_EXPERTS = ("high_noise", "low_noise")


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA entry of a job: the file, its strength, and which of the family's models it goes on
    (names as the family calls them; empty = every model, e.g. Animate's single DiT)."""

    file: LoraFile
    strength: float = 1.0
    experts: tuple[str, ...] = ()
    ignore_absent_image_attention: bool = False  # see binding.bind_lora


@dataclass(frozen=True)
class JobLoras:
    """Every request of a job bound to the models it names; built before anything is applied."""

    entries: tuple[tuple[LoraRequest, Mapping[str, BoundLora]], ...]  # per request: model name -> bound

    def on(self, expert: str) -> tuple[BoundLora, ...]:
        """The LoRAs for one model, in request order."""
        return tuple(bound[expert] for _, bound in self.entries if expert in bound)


def bind_requests(requests: Sequence[LoraRequest], models: Mapping[str, nn.Module]) -> JobLoras:
    """Bind each request to each model it names; the first misfit raises its LoraError (nothing applied)."""
    entries = []
    for request in requests:
        names = tuple(dict.fromkeys(request.experts)) or tuple(models)
        unknown = [n for n in names if n not in models]
        if unknown:
            raise request.file.error(f"expert {unknown[0]!r}: this model family has {', '.join(map(repr, models))}")
        entries.append((request, {name: bind_lora(request.file, models[name], request.strength,
                                                  ignore_absent_image_attention=request.ignore_absent_image_attention)
                                  for name in names}))  # fmt: skip
    return JobLoras(tuple(entries))


class AppliedLoras:
    """A job's LoRAs on its models; remove() restores every model exactly (hooks off, merges undone)."""

    def __init__(self, job: JobLoras, methods: Mapping[str, Method]) -> None:
        self.job, self.methods = job, dict(methods)
        self._undo: list[MergedLoras | LoraHooks] = []
        self._stack = ExitStack()
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        try:
            for undo in reversed(self._undo):
                undo.restore() if isinstance(undo, MergedLoras) else undo.remove()
        finally:
            self._stack.close()

    def describe(self) -> list[dict[str, Any]]:
        """Per LoRA, for the sidecar: file, sha256, strength, format, experts, method, weights changed
        (distinct parameters of each model) and, where some were dropped on request, ignored_keys."""
        return [{
            "file": request.file.name, "sha256": request.file.sha256, "strength": request.strength,
            "format": request.file.format.value, "experts": list(bound),
            "method": {n: self.methods[n].value for n in bound},
            "weights": {n: len(b.touched) for n, b in bound.items()},
            **({"ignored_keys": {n: len(b.ignored) for n, b in bound.items()}}
               if any(b.ignored for b in bound.values()) else {}),
        } for request, bound in self.job.entries]  # fmt: skip

    def __enter__(self) -> AppliedLoras:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


def apply_loras(job: JobLoras, models: Mapping[str, nn.Module], methods: Mapping[str, Method], *,
                pristine: Mapping[str, PristineWeights] | None = None, eager: bool = True) -> AppliedLoras:  # fmt: skip
    """Apply `job` to `models`, each by its method (a missing name = merged); on any error what was
    applied is undone. pristine: one store per model name, kept by the caller across jobs (see merge.py);
    eager: compiled blocks run eagerly while any model carries hooks (hooks.py)."""
    applied = AppliedLoras(job, {name: methods.get(name, Method.MERGED) for name in models})
    try:
        if eager and any(job.on(n) and applied.methods[n] is Method.UNMERGED for n in models):
            applied._stack.enter_context(torch.compiler.set_stance("force_eager"))  # once for every model
        for name, model in models.items():
            loras = job.on(name)
            if not loras:
                continue
            store = (pristine or {}).get(name)
            if applied.methods[name] is Method.MERGED:
                applied._undo.append(merge_loras(model, loras, store))
            else:
                applied._undo.append(hook_loras(model, loras, eager=False, pristine=store))
    except BaseException:
        applied.remove()
        raise
    return applied
