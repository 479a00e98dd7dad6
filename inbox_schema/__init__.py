"""The manifest contract (schema v1): parse and validate TOML job manifests into resolved Jobs.

Everything the daemon, the ledger and `wanbox validate` import lives here; it must not import torch
or touch the ledger, and must never move, hash or delete inbox files on its own.
"""

from inbox_schema.checks import file_sha256, input_problems
from inbox_schema.codec import JobDataError
from inbox_schema.errors import MISSING, ManifestError, ManifestInvalid, render_errors
from inbox_schema.hashing import manifest_hash
from inbox_schema.job import InputFile, Job, SamplingSettings, VideoSettings
from inbox_schema.jsonschema import json_schema
from inbox_schema.kinds import Kind, get_kind, kind_for_model, kinds, model_folders, model_ids
from inbox_schema.kinds.animate import AnimateSettings
from inbox_schema.manifest import load_manifest, parse_manifest_text
from inbox_schema.paths import is_temporary_name

__all__ = [
    "MISSING", "AnimateSettings", "InputFile", "Job", "JobDataError", "Kind", "ManifestError", "ManifestInvalid",
    "SamplingSettings", "VideoSettings", "file_sha256", "get_kind", "input_problems", "is_temporary_name",
    "json_schema", "kind_for_model", "kinds", "load_manifest", "manifest_hash", "model_folders", "model_ids",
    "parse_manifest_text",
    "render_errors",
]
