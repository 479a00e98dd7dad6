"""LoRAs on the resident Wan DiTs, per job: read the files people publish, check them against the model,
apply them merged or unmerged, and take them off again without a trace (bitwise).

Must not load or reload base weights, read manifests, or pick files from a library: the job contract and the
pool's families do that and call this API.

Reading (files.py, keys.py)
    read_lora(path) -> LoraFile            .safetensors, .ckpt/.pth/.pt/.bin (torch zip or legacy); .format
                                           (LoraFormat: original | kohya | diffusers | peft), .sha256,
                                           .tensors, .refs (each key: module in our names + what it holds)
Checking (binding.py)
    bind_lora(lora, model, strength=1.0, ignore_absent_image_attention=False) -> BoundLora
                                           every key must name a weight of `model` with a fitting shape,
                                           else LoraError (a ValueError: file, format, unmapped keys, shape
                                           and rank mismatches); .low_rank, .diffs, .touched, .ignored
                                           (the flag drops k_img/v_img/img_emb keys a model without image
                                           attention cannot use: lightx2v's Wan2.2 I2V LoRAs carry them)
Applying to one model (merge.py, hooks.py)
    merge_loras(model, [bound, ...], pristine=None) -> MergedLoras      .restore(): bit-exact weights back
    hook_loras(model, [bound, ...], eager=True, pristine=None) -> LoraHooks   .remove(); a context manager
    PristineWeights(device="cpu", pin_memory=False)    exact copies of touched weights, reusable across jobs
Choosing (method.py)
    choose_method(bound, forwards=, tokens=, pristine_room_bytes=, compiled=, costs=SwitchCosts()) -> Method
A job across a family's models (jobs.py)
    bind_requests([LoraRequest(file, strength, experts=("high_noise",)), ...], {"high_noise": m, ...})
                                           (experts=() = every model; Animate has one)
        -> JobLoras
    apply_loras(job, models, {"high_noise": Method.MERGED, ...}, pristine={...}) -> AppliedLoras
        .remove(), .describe() -> per LoRA {file, sha256, strength, format, experts, method, weights}

Example (one I2V job):
    job = bind_requests([LoraRequest(read_lora(high_file), 1.0, ("high_noise",)),
                         LoraRequest(read_lora(low_file), 1.0, ("low_noise",))], {"high_noise": hi, "low_noise": lo})
    with apply_loras(job, {"high_noise": hi, "low_noise": lo}, methods, pristine=stores) as applied:
        video = ...  # sample as usual
    sidecar["loras"] = applied.describe()
"""

from pipeline.lora.binding import BoundLora, FullDiff, LowRank, bind_lora
from pipeline.lora.errors import LoraError
from pipeline.lora.files import LoraFile, read_lora
from pipeline.lora.hooks import LoraHooks, hook_loras
from pipeline.lora.jobs import I2V_EXPERTS, AppliedLoras, JobLoras, LoraRequest, apply_loras, bind_requests
from pipeline.lora.keys import LoraFormat
from pipeline.lora.merge import MergedLoras, PristineWeights, merge_loras
from pipeline.lora.method import Method, SwitchCosts, choose_method, touched_bytes

__all__ = [
    "I2V_EXPERTS", "AppliedLoras", "BoundLora", "FullDiff", "JobLoras", "LoraError", "LoraFile", "LoraFormat",
    "LoraHooks", "LoraRequest", "LowRank", "MergedLoras", "Method", "PristineWeights", "SwitchCosts",
    "apply_loras", "bind_lora", "bind_requests", "choose_method", "hook_loras", "merge_loras", "read_lora",
    "touched_bytes",
]  # fmt: skip
