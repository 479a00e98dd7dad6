"""What a warm pool keeps resident on one GPU, in bytes, by precision; a job's peak on top of it; the smallest
card that runs it. For the FP8 bench and `wanbox doctor`.

Counts the real-size modules built on the meta device (nothing is allocated or read); the activation peaks are
the ones measured in bench/RESULTS.md. Must not load weights or need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GIB = 2**30
SIZES = ("480p", "720p")
FAMILIES = ("i2v", "animate")
# Bytes above the resident weights during one 81-frame I2V job on one GPU (compiled blocks, FA3), GiB.
# 720p, measured: bench_pool peaked at 46.1 GiB with one 26.6 GiB expert resident, fp32 VAE decode included.
# The decode is the job's largest transient (bench_vae, 720p fp32: 19.3 GiB with its 0.47 GiB of weights);
# the DiT forward's is 6.6 GiB (33.2 - 26.6). 480p, estimated: the DiT's 3.3 GiB is measured (29.9 - 26.6);
# the decode's is the 720p one scaled by the latent area (60 x 104 / 90 x 160 = 0.433; the causal decoder
# holds one latent frame's activations at a time), 0.433 x 18.8, plus the 0.7 GiB the 720p job held beyond
# its decode. FP8 weights change neither (activations stay bf16 / fp32); bench/bench_fp8.py measures both.
JOB_TRANSIENT_GIB = {"720p": 19.5, "480p": 8.8}
RESERVE_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation: not in max_memory_allocated
# NVIDIA cards with FP8 tensor cores (compute capability 8.9+), smallest first: total memory in GiB as the
# driver reports it (the H200's seen on the bench machines; the others from their data sheets, rounded down).
CARDS = ((22.0, "L4"), (23.9, "RTX 4090"), (44.9, "L40S"), (47.9, "RTX 6000 Ada"), (79.6, "H100 80GB"),
         (93.5, "H100 NVL"), (140.3, "H200"))  # fmt: skip
H100_80GB = 79.6


@dataclass(frozen=True)
class Footprint:
    """Resident bytes per part of a pool on one GPU (parts in `offloaded` wait in host memory instead)."""

    family: str
    precision: str
    parts: dict[str, int]
    offloaded: tuple[str, ...] = ()

    @property
    def resident_bytes(self) -> int:
        return sum(size for name, size in self.parts.items() if name not in self.offloaded)

    def job_peak_bytes(self, size: str) -> int:
        """Resident weights + the job's transient peak (I2V; see JOB_TRANSIENT_GIB) + the reserve."""
        if self.family != "i2v" or size not in JOB_TRANSIENT_GIB:
            raise ValueError(f"job peak: known for i2v at {', '.join(SIZES)}; got {self.family} at {size!r}")
        return self.resident_bytes + int((JOB_TRANSIENT_GIB[size] + RESERVE_GIB) * GIB)

    def fits(self, size: str, memory_bytes: int) -> bool:
        return self.job_peak_bytes(size) <= memory_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "precision": self.precision, "offloaded": list(self.offloaded),
                "parts_gib": {k: round(v / GIB, 2) for k, v in self.parts.items()},
                "resident_gib": round(self.resident_bytes / GIB, 2)}  # fmt: skip


def pool_footprint(family: str = "i2v", precision: str = "bf16", *, offload_experts: bool = False) -> Footprint:
    """The real-size pool on one GPU: I2V = two experts, T5, VAE; Animate = DiT, T5, VAE, CLIP (I2V has no
    CLIP). DiT and T5 in bf16 (their FP8 layers in e4m3 with float32 row scales), VAE in float32, CLIP in
    float16 with float32 norms, as the pool loads them. offload_experts (I2V, one GPU): the idle expert in
    host memory."""
    from pipeline.models.fp8 import PRECISIONS

    if family not in FAMILIES or precision not in PRECISIONS:
        raise ValueError(f"footprint: got family {family!r}, precision {precision!r}; expected one of "
                         f"{', '.join(FAMILIES)} and one of {', '.join(PRECISIONS)}")  # fmt: skip
    parts = {**_dit_parts(family, precision), "t5": _t5_bytes(), "vae": _vae_bytes()}
    if family == "animate":
        parts["clip"] = _clip_bytes()
    offloaded = ("low_noise",) if offload_experts and family == "i2v" else ()
    return Footprint(family, precision, parts, offloaded)


def smallest_card(footprint: Footprint, size: str) -> tuple[float, str] | None:
    """(GiB, name) of the smallest card in CARDS that holds the job's peak; None if none does."""
    need = footprint.job_peak_bytes(size)
    return next(((gib, names) for gib, names in CARDS if need <= gib * GIB), None)


def memory_report() -> dict[str, Any]:
    """I2V in bf16 and fp8, all resident and with the idle expert offloaded: resident GiB, the job peak per
    size, whether it fits one 80 GB H100, and the smallest card for a 480p job; Animate's resident GiB."""
    report: dict[str, Any] = {"reserve_gib": RESERVE_GIB, "job_transient_gib": JOB_TRANSIENT_GIB, "i2v": {}}
    for precision in ("bf16", "fp8"):
        for offload in (False, True):
            fp = pool_footprint("i2v", precision, offload_experts=offload)
            card = smallest_card(fp, "480p")
            report["i2v"][f"{precision}{'_offload' if offload else ''}"] = {
                **fp.as_dict(),
                "job_peak_gib": {s: round(fp.job_peak_bytes(s) / GIB, 1) for s in SIZES},
                "fits_h100_80gb": {s: fp.fits(s, int(H100_80GB * GIB)) for s in SIZES},
                "smallest_card_480p": None if card is None else {"gib": card[0], "card": card[1]},
            }
    report["animate"] = {p: pool_footprint("animate", p).as_dict() for p in ("bf16", "fp8")}
    return report


# ---------------------------------------------------------------------------------------------- counting


def module_bytes(model: nn.Module, precision: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a DiT's parameters and buffers in `dtype`; with "fp8", its fp8_targets weights count one
    byte per element plus a float32 scale per row (biases stay in `dtype`)."""
    from pipeline.models.fp8 import fp8_targets

    itemsize = torch.empty((), dtype=dtype).element_size()
    fp8_weights = {id(layer.weight) for _name, layer in fp8_targets(model)} if precision == "fp8" else set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in fp8_weights:
            total += tensor.numel() + tensor.shape[0] * 4
        else:
            total += tensor.numel() * (itemsize if tensor.is_floating_point() else tensor.element_size())
    return total


def _dit_parts(family: str, precision: str) -> dict[str, int]:
    from pipeline.models.animate_dit import AnimateConfig, WanAnimateDiT
    from pipeline.models.dit import DiTConfig, WanDiT

    with torch.device("meta"):
        if family == "animate":
            return {"dit": module_bytes(WanAnimateDiT(AnimateConfig.real_14b()), precision)}
        expert = module_bytes(WanDiT(DiTConfig.real_14b()), precision)
    return {"high_noise": expert, "low_noise": expert}  # the two experts have one architecture


def _t5_bytes() -> int:
    from pipeline.models.t5 import T5Config, T5Encoder

    with torch.device("meta"):
        return _numel(T5Encoder(T5Config())) * 2  # the released file is bf16 and runs so


def _vae_bytes() -> int:
    from pipeline.models.vae import VaeConfig, VideoVAE

    with torch.device("meta"):
        return _numel(VideoVAE(VaeConfig())) * 4  # the pool's VAE runs in float32


def _clip_bytes() -> int:
    from pipeline.models.clip import ClipVisionConfig, LayerNorm, VisionTower

    with torch.device("meta"):
        tower = VisionTower(ClipVisionConfig())
    norms = sum(_numel(m) for m in tower.modules() if isinstance(m, LayerNorm))
    return (_numel(tower) - norms) * 2 + norms * 4  # float16, norms in float32


def _numel(module: nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])
