"""Published LoRA sets that `wanbox models pull --lora NAME` fetches into the LoRA library (<models>/loras/<folder>/),
with the files' paths in their Hub repos, so that manifests name them as `library = "<folder>/<path>"`.

Plain data; it must not import torch (the CLI lists these) nor download anything itself (hub.py does).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraPack:
    """Some files of one Hub repo, put under <library>/<folder>/ at their repo paths."""

    name: str
    repo_id: str
    files: tuple[str, ...]
    purpose: str

    @property
    def folder(self) -> str:
        return self.repo_id.split("/", 1)[1]

    def library_names(self) -> tuple[str, ...]:
        """What a manifest writes as [[lora]] library = "..." for each file."""
        return tuple(f"{self.folder}/{path}" for path in self.files)


LIGHTNING_I2V = LoraPack(
    name="lightning-i2v-A14B",
    repo_id="lightx2v/Wan2.2-Lightning",
    files=("Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors",
           "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model.safetensors"),
    purpose="lightx2v's 4-step I2V-A14B distillation, one LoRA per expert (sampling.preset = \"lightning-4step\")",
)

LIGHTX2V_ANIMATE = LoraPack(
    name="lightx2v-animate-14B",
    repo_id="lightx2v/Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v",
    files=("loras/Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors",),
    purpose="lightx2v's Wan2.1 I2V 4-step distillation, which LightX2V runs on Animate-14B "
            "(sampling.preset = \"lightning-4step\")",
)

PACKS: dict[str, LoraPack] = {pack.name: pack for pack in (LIGHTNING_I2V, LIGHTX2V_ANIMATE)}


def get_pack(name: str) -> LoraPack:
    found = PACKS.get(name)
    if found is None:
        raise ValueError(f"unknown LoRA pack {name!r}; known: {', '.join(PACKS)}")
    return found
