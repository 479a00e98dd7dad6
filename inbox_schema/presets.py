"""Sampling presets: `[sampling] preset = "..."` fills the sampling fields a manifest leaves out with the values
a published distillation LoRA expects. Explicit fields still win.

Plain data and one merge; it must not pick LoRA files (the manifest lists them) nor check ranges (manifest.py
reads the merged table as if the user had written it).
"""

from __future__ import annotations

from dataclasses import dataclass

from inbox_schema.reader import Reader

# Keys that only make sense together: a manifest that sets any of them replaces the preset's schedule as a whole
# (an explicit `steps = 8` cannot run over a 4-entry timestep list), and the kind's defaults fill the rest.
SCHEDULE_KEYS = ("steps", "solver", "timesteps")


@dataclass(frozen=True)
class Preset:
    """A named set of [sampling] values per kind; `source` says where each value was published."""

    name: str
    purpose: str  # finishes "<name>: ..." in `wanbox validate` and the README
    values: dict[str, dict[str, object]]  # kind -> the [sampling] keys it sets, as a manifest would write them
    source: str
    loras: str = ""  # what the preset expects to run with, for the note when a job has no LoRA


LIGHTNING_4STEP = Preset(
    name="lightning-4step",
    purpose="4 steps without guidance, for lightx2v's step/CFG distillation LoRAs",
    values={
        # lightx2v's Wan2.2-Lightning I2V-A14B (Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1, one LoRA per expert):
        # its repository's wan/configs/wan_i2v_A14B.py (sample_steps 4, sample_shift 5.0, boundary 0.900,
        # sample_guide_scale (1.0, 1.0)) with generate.py's default solver "euler" over get_timesteps(4) =
        # linspace(1000, 0, 5)[:-1] = [1000, 750, 500, 250], shifted by 5 -> 1000, 937.5, 833.3, 625. LightX2V's
        # configs/wan22/wan_moe_i2v_distill.json says the same: denoising_step_list [1000, 750, 500, 250],
        # sample_shift 5.0, enable_cfg false, boundary_step_index 2 (steps 1-2 high noise, 3-4 low noise), which
        # boundary 0.9 reproduces (937 >= 900 > 833).
        "i2v": {"steps": 4, "solver": "euler", "timesteps": [1000, 750, 500, 250], "shift": 5.0,
                "guide_scale": 1.0, "boundary": 0.9},
        # Animate-14B has no distillation LoRA of its own; LightX2V runs it with lightx2v's Wan2.1 I2V-14B-480P
        # step/CFG distillation LoRA (configs/wan22/wan_animate_lora.json: infer_steps 4, sample_shift 5.0,
        # sample_guide_scale 1.0, enable_cfg false) on its default UniPC scheduler, as here.
        "animate": {"steps": 4, "solver": "unipc", "shift": 5.0, "guide_scale": 1.0},
    },
    source="ModelTC/Wan2.2-Lightning wan/configs/wan_i2v_A14B.py; ModelTC/LightX2V configs/wan22/"
           "wan_moe_i2v_distill.json and wan_animate_lora.json",
    loras="i2v: the Wan2.2-Lightning pair, one per expert (wanbox models pull --lora lightning-i2v-A14B); animate: "
          "lightx2v's Wan2.1 I2V 480P distillation LoRA (wanbox models pull --lora lightx2v-animate-14B)",
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (LIGHTNING_4STEP,)}


def with_preset(r: Reader, table: dict, kind: str) -> tuple[dict, str | None]:
    """The [sampling] table with the preset's values under the manifest's own, and the preset's name (None
    without one). An unknown preset, or one without values for `kind`, is reported and applies nothing."""
    if "preset" not in table:
        return table, None
    own = {key: value for key, value in table.items() if key != "preset"}
    name = r.choice(table, "preset", "sampling.preset", "", tuple(PRESETS))
    preset = PRESETS.get(name)
    if preset is None:
        return own, None
    values = preset.values.get(kind)
    if values is None:
        kinds = ", ".join(f'kind = "{k}"' for k in preset.values)
        r.error("sampling.preset", name, f"a preset for kind = \"{kind}\" ({name} is for {kinds})")
        return own, None
    if any(key in own for key in SCHEDULE_KEYS):
        values = {key: value for key, value in values.items() if key not in SCHEDULE_KEYS}
    return {**values, **own}, name
