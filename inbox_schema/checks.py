"""Checks of a job's input files against the manifest: present, the size and sha256 it declares.

For `wanbox validate` and the watcher's staging; reports problems as ManifestErrors and never
moves, changes or deletes a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from inbox_schema.errors import ManifestError
from inbox_schema.job import InputFile, Job


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's content, read in 16 MiB blocks (uploads, LoRA files and checkpoints alike: large
    blocks keep multi-GB files at the hash's own speed)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while block := stream.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def input_problems(job: Job, verify_sha256: bool = True) -> list[ManifestError]:
    """What keeps a job waiting: inputs (and uploaded LoRAs) missing, or not (yet) of the size or sha256 declared."""
    problems = (_input_problem(item, verify_sha256) for item in job.files().values())
    return [problem for problem in problems if problem is not None]


def _input_problem(item: InputFile, verify_sha256: bool) -> ManifestError | None:
    field, table = item.field, item.field.removesuffix(".path")
    if not item.path.is_file():
        return ManifestError(field, item.relpath, "an existing file beside the manifest (not found yet: "
                             "upload the media before the manifest)")
    size = item.path.stat().st_size
    if item.size is not None and size != item.size:
        return ManifestError(f"{table}.size", item.size, f"the file's size, but the file has {size} bytes")
    if verify_sha256 and item.sha256 is not None and (actual := file_sha256(item.path)) != item.sha256:
        return ManifestError(f"{table}.sha256", item.sha256, f"the file's sha256, but the file has {actual}")
    return None
