"""The content hash that recognises identical resubmissions: same job, same input contents.

It must not read input files (the watcher hashes them while staging) nor depend on names or places.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from inbox_schema.errors import ManifestError, ManifestInvalid
from inbox_schema.job import Job
from inbox_schema.manifest import parse_manifest_text

HASH_VERSION = "wanbox-manifest-hash-v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_hash(manifest_bytes: bytes, input_sha256s: dict[str, str], lora_sha256s: Sequence[str] = ()) -> str:
    """sha256 hex of the canonical job; `input_sha256s` maps each input role to its file's sha256, `lora_sha256s`
    gives each [[lora]] file's sha256 in manifest order.

    Identical means: the same video would come out. The hash covers the resolved job (defaults
    filled in, so `steps = 40` written out equals leaving it out) plus the sha256 of each input's
    content, and leaves out what does not change the video: the name, the priority, the input file
    names, where the manifest lies, and the orientation of video.size (only its area is used). A LoRA counts by
    its content, strength and experts (not its name or whether it came from the library or an upload); fields
    added later (LoRAs, the preset) are left out at their defaults, so older jobs keep their hashes.
    A manifest without a seed hashes with seed = null, so its resubmission is recognised even though
    each acceptance draws its own random seed.

    Raises ManifestInvalid for a manifest that does not validate, ValueError when the roles given
    are not exactly the job's inputs or a hash is not 64 hex digits.
    """
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        error = ManifestError("manifest", f"byte {exc.start}", "UTF-8 text (save the file as UTF-8)")
        raise ManifestInvalid([error]) from exc
    job = parse_manifest_text(text, "manifest.toml", Path("."), None, check_inputs=False)
    canonical = job.to_dict()
    for volatile in ("name", "priority", "notify"):  # who is told about the video does not change it
        del canonical[volatile]
    canonical["inputs"] = _input_hashes(set(job.inputs), input_sha256s)
    canonical["loras"] = _lora_hashes(job, lora_sha256s)
    if not canonical["loras"]:
        del canonical["loras"]
    if canonical["sampling"]["preset"] is None:
        del canonical["sampling"]["preset"]
    # v1's canonical form had an "animate" entry for every kind (null for the others): kept, so that the
    # hashes earlier versions recorded in the ledger still recognise their resubmissions.
    canonical.setdefault("animate", None)
    for orientation_only in ("size", "width", "height"):
        del canonical["video"][orientation_only]  # both kinds use only the area; the inputs set the aspect
    blob = json.dumps([HASH_VERSION, canonical], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _lora_hashes(job: Job, given: Sequence[str]) -> list[dict[str, object]]:
    if len(given) != len(job.loras):
        raise ValueError(f"lora_sha256s has {len(given)} hashes: expected {len(job.loras)}, one per [[lora]]")
    for i, value in enumerate(given):
        if not _SHA256.fullmatch(value.lower()):
            raise ValueError(f"lora_sha256s[{i}] = {value!r}: expected 64 hexadecimal characters")
    return [{"sha256": value.lower(), "strength": lora.strength, "experts": list(lora.experts)}
            for value, lora in zip(given, job.loras, strict=True)]


def _input_hashes(roles: set[str], given: dict[str, str]) -> dict[str, str]:
    if set(given) != roles:
        raise ValueError(f"input_sha256s has roles {sorted(given)}: expected exactly {sorted(roles)}")
    hashes = {role: value.lower() for role, value in given.items()}
    for role, value in hashes.items():
        if not _SHA256.fullmatch(value):
            raise ValueError(f"input_sha256s[{role!r}] = {value!r}: expected 64 hexadecimal characters")
    return hashes
