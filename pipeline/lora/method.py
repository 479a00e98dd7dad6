"""Pick how a job's LoRAs go onto one model: merged into the weights, or unmerged hooks. A cost rule whose
constants bench/bench_lora.py measures on the target GPU.

Must not apply anything (merge.py, hooks.py do) nor know about jobs or manifests.

The rule, per model (an I2V expert, the Animate DiT), for one job:
* Merged needs room for the pristine copy of every touched weight (merge.py): without it, unmerged.
* Merged costs once per job: merge + restore, proportional to the bytes touched (~28.6 GB for a distillation
  LoRA on a 14B bf16 expert), and nothing per forward; the compiled graphs stay valid (same shapes).
* Unmerged costs per forward: two thin GEMMs per hooked Linear, memory-bound on the activations, so
  proportional to tokens x hooked layers; and a compiled model runs eagerly meanwhile (hooks.py), which
  loses the compile speed-up, also proportional to tokens (measured: ~1.7 s of 13.2 s at 720p, ~0.8 s of
  3.7 s at 480p, bench/RESULTS.md).
So a 4-step distillation job on a compiled pool merges (the eager penalty alone outweighs a merge), a short
uncompiled low-resolution job with a small style LoRA hooks, and memory decides when the copy cannot fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from pipeline.lora.binding import BoundLora
from pipeline.lora.hooks import FUNCTIONAL_LINEARS

GIB = 2**30


class Method(str, Enum):
    MERGED = "merged"
    UNMERGED = "unmerged"


@dataclass(frozen=True)
class SwitchCosts:
    """Seconds per unit, measured by bench/bench_lora.py (its `costs` line); defaults are H200 estimates
    (pinned host copies at ~45 GB/s; hooks ~0.25 s per 14B forward at 720p; eager vs compiled from
    bench/RESULTS.md) until measured."""

    merge_restore_s_per_gib: float = 0.05  # merge + restore per GiB touched, the pristine copy already kept
    hook_s_per_layer_ktoken: float = 1.1e-5  # per hooked Linear, per 1000 tokens, per forward
    eager_s_per_ktoken: float = 0.023  # what running eagerly costs a compiled model, per 1000 tokens per forward


def touched_bytes(loras: Sequence[BoundLora]) -> int:
    """Bytes of the distinct weights the LoRAs change (what a pristine copy of them takes)."""
    sizes: dict[str, int] = {}
    for lora in loras:
        sizes.update(lora.touched)
    return sum(sizes.values())


def hooked_layers(loras: Sequence[BoundLora]) -> int:
    """Linears that would carry a low-rank hook (what the unmerged per-forward cost scales with)."""
    return len({c.module for lora in loras for c in lora.low_rank if c.module not in FUNCTIONAL_LINEARS})


def choose_method(loras: Sequence[BoundLora], *, forwards: int, tokens: int, pristine_room_bytes: int,
                  compiled: bool, costs: SwitchCosts = SwitchCosts()) -> Method:  # fmt: skip
    """MERGED or UNMERGED for these LoRAs on one model in one job of `forwards` forwards of `tokens` tokens.

    pristine_room_bytes: memory free where the pristine copies would go (host or GPU, see merge.py), counting
    copies already kept as free; compiled: whether the model's blocks are compiled (pipeline.models.fast)."""
    if not loras:
        return Method.MERGED  # nothing to apply either way
    if touched_bytes(loras) > pristine_room_bytes:
        return Method.UNMERGED  # a merge could not be undone exactly
    merged_s = touched_bytes(loras) / GIB * costs.merge_restore_s_per_gib
    per_forward = hooked_layers(loras) * tokens / 1000 * costs.hook_s_per_layer_ktoken
    if compiled:
        per_forward += tokens / 1000 * costs.eager_s_per_ktoken
    return Method.MERGED if merged_s <= forwards * per_forward else Method.UNMERGED
