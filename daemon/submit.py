"""`wanbox submit`: copy a job into the inbox the way every upload should be done.

Media first, the manifest last, each under a temporary dotfile name, fsynced, then renamed, so the
daemon never sees a partial file. It must never overwrite or delete anything already in the inbox.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from daemon.jobfiles import fsync_dir
from daemon.outbox import link_without_replacing
from daemon.watcher import FOLDER_MANIFEST
from inbox_schema import file_sha256, load_manifest


class SubmitError(ValueError):
    """The job cannot be submitted as given (exit 2): says which file and why."""


def _copy_durably(src: Path, dest: Path) -> None:
    """Copy to a dotfile beside `dest`, fsync, then link it to `dest` (never replacing) and fsync the dir."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        shutil.copyfile(src, temp)
        with open(temp, "rb") as fh:
            os.fsync(fh.fileno())
        link_without_replacing(temp, dest)  # FileExistsError rather than replacing someone else's file
    finally:
        if temp.exists():
            temp.unlink()
    fsync_dir(dest.parent)


def _locate(src: Path) -> tuple[Path, bool]:
    """(manifest, folder layout?) for a manifest file or a folder holding job.toml."""
    if src.is_dir():
        manifest = src / FOLDER_MANIFEST
        if not manifest.is_file():
            raise SubmitError(f"{src}: a folder job needs {FOLDER_MANIFEST} inside it")
        return manifest, True
    if not src.is_file():
        raise SubmitError(f"{src}: no such manifest file")
    return src, src.name == FOLDER_MANIFEST


def submit(src: Path, inbox: Path, name: str | None = None) -> list[str]:
    """Validate the job at `src` and copy it into `inbox`; returns what was done, line by line."""
    manifest, folder_layout = _locate(src)
    job = load_manifest(manifest, manifest.parent)  # ManifestInvalid says what is wrong (exit 2)
    for item in job.inputs.values():
        if not item.path.is_file():
            raise SubmitError(f"inputs.{item.role} = {item.relpath!r}: no such file {item.path}")
    if not inbox.is_dir():
        raise SubmitError(f"inbox {inbox} does not exist: is the daemon's root right (--root/--config)?")
    if folder_layout:
        return _submit_folder(manifest, job, inbox, name or manifest.parent.name)
    return _submit_flat(manifest, job, inbox, name or manifest.stem)


def _submit_flat(manifest: Path, job: object, inbox: Path, name: str) -> list[str]:
    target = inbox / f"{name}.toml"
    if os.path.lexists(target):
        raise SubmitError(f"{target} already exists (a job of that name is waiting): use --name")
    done = []
    for item in job.inputs.values():  # type: ignore[attr-defined]
        dest = inbox / item.relpath
        if os.path.lexists(dest):
            if dest.is_file() and file_sha256(dest) == file_sha256(item.path):
                done.append(f"{item.relpath}: already in the inbox with the same content")
                continue
            raise SubmitError(f"{dest} already exists with other content: rename your file, or submit a folder")
        _copy_durably(item.path, dest)
        done.append(f"copied {item.path} -> {dest}")
    _copy_durably(manifest, target)  # last: the manifest is what starts the job
    done.append(f"submitted {target}")
    return done


def _submit_folder(manifest: Path, job: object, inbox: Path, name: str) -> list[str]:
    target = inbox / name
    if os.path.lexists(target):
        raise SubmitError(f"{target} already exists (a job of that name is waiting): use --name")
    staging = inbox / f".{name}.{secrets.token_hex(4)}.tmp"  # a dotfolder: the daemon ignores it
    staging.mkdir()
    try:
        for item in job.inputs.values():  # type: ignore[attr-defined]
            _copy_durably(item.path, staging / item.relpath)
        _copy_durably(manifest, staging / FOLDER_MANIFEST)
        os.rename(staging, target)  # the whole folder appears at once, complete
        fsync_dir(inbox)
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # only our own temporary copy
    return [f"submitted {target}/ ({len(job.inputs)} input(s) + {FOLDER_MANIFEST})"]  # type: ignore[attr-defined]
