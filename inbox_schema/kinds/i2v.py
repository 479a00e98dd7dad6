"""The `i2v` kind: one image and a prompt become a video on the two-expert Wan2.2 I2V-A14B model.

Its registry entry only; it must not hold validation logic (the common manifest reader applies the entry).
"""

from __future__ import annotations

from inbox_schema.kinds.registry import InputRole, Kind

I2V = Kind(
    name="i2v",
    model_id="i2v-A14B",
    model_folder="Wan2.2-I2V-A14B",
    purpose="turn an image into a video",
    inputs=(InputRole("image", "image", "cat.jpg"),),
    sizes=("1280*720", "720*1280", "832*480", "480*832"),
    default_steps=40,
    default_fps=16,
    default_guide=(3.5, 3.5),
    experts=2,
    prepare="pipeline.preprocess.image:prepare_i2v_job",
    family="pipeline.families.i2v:I2VFamily",
    layout="pipeline.weights.layouts:I2V_A14B",
)
