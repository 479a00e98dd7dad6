"""Download, verify and list the Wan2.2 checkpoints: `wanbox models pull|verify|list` (wired by the daemon).

Must not import torch (the supervisor imports this) and must never leave a half-verified file looking good.

pull: list the repo's files with sizes and LFS sha256 (HfApi.model_info(files_metadata=True)), keep the ones
the family needs, print the total, check free disk space, download each with hf_hub_download into the
checkpoint directory (resumable; complete files are skipped), then verify size and sha256 of every file.
The Hub metadata is recorded in `.wanbox-files.json` so `verify` can check sizes (and, --deep, sha256) later.
Published LoRA sets (lora_packs.py) are pulled the same way into the LoRA library: `wanbox models pull --lora PACK`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from inbox_schema import file_sha256
from pipeline.weights.layouts import check_installed, families, get_family
from pipeline.weights.lora_packs import get_pack

MANIFEST = ".wanbox-files.json"
Print = Callable[[str], None]


class HubError(RuntimeError):
    """The Hub or the disk cannot give a complete, verified checkpoint (message says what and how to fix)."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None  # LFS files only


class Hub(Protocol):
    """The one boundary to the Hugging Face Hub (tests substitute a local double)."""

    def list_files(self, repo_id: str) -> list[RemoteFile]: ...

    def download(self, repo_id: str, path: str, dest: Path) -> Path: ...


class HuggingFaceHub:
    """The real Hub through huggingface_hub (token and endpoint from its usual environment variables)."""

    def list_files(self, repo_id: str) -> list[RemoteFile]:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, files_metadata=True)
        return [
            RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in info.siblings or []
        ]

    def download(self, repo_id: str, path: str, dest: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, path, local_dir=dest))


# ---------------------------------------------------------------------------------------------- pull


def pull(family: str, dest: Path | str, hub: Hub | None = None, say: Print = print) -> list[str]:
    """Download what `family` needs into `dest` (its checkpoint directory); returns the files fetched now."""
    fam = get_family(family)
    return fetch(family, fam.repo_id, fam.wants, fam.files, dest, hub, say)


def pull_loras(pack: str, library: Path | str, hub: Hub | None = None, say: Print = print) -> list[str]:
    """Download a published LoRA set (pipeline.weights.lora_packs) into the LoRA library, under its folder; the
    manifest names its files as [[lora]] library = "<folder>/<path>". Returns the files fetched now."""
    found = get_pack(pack)
    fetched = fetch(pack, found.repo_id, lambda path: path in found.files, found.files,
                    Path(library) / found.folder, hub, say)
    for name in found.library_names():
        say(f'  [[lora]] library = "{name}"')
    return fetched


def fetch(what: str, repo_id: str, wants: Callable[[str], bool], required: tuple[str, ...], dest: Path | str,
          hub: Hub | None = None, say: Print = print) -> list[str]:
    """Sizes first, free space checked, each missing file downloaded (resumable: complete ones are skipped), then
    size and sha256 of every downloaded file checked against the Hub's listing (recorded in .wanbox-files.json)."""
    dest, hub = Path(dest), hub or HuggingFaceHub()
    try:
        remote = [f for f in hub.list_files(repo_id) if wants(f.path)]
    except Exception as exc:
        raise HubError(f"cannot list {repo_id} on the Hub: {exc} (network? HF_TOKEN? HF_ENDPOINT?)") from exc
    absent = sorted(set(required) - {f.path for f in remote})
    if absent:
        raise HubError(f"{repo_id} on the Hub lacks files wanbox needs: {', '.join(absent)}")
    total = sum(f.size or 0 for f in remote)
    say(f"{what}: {len(remote)} files, {human_size(total)} from {repo_id} into {dest}")
    todo = [f for f in remote if not _complete(dest / f.path, f)]
    remaining = sum(f.size or 0 for f in todo)
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if remaining > free:
        raise HubError(f"{dest}: {human_size(remaining)} still to download but only {human_size(free)} free")
    _write_manifest(dest, repo_id, remote)
    for i, f in enumerate(todo, 1):
        say(f"  [{i}/{len(todo)}] {f.path} ({human_size(f.size or 0)})")
        try:
            hub.download(repo_id, f.path, dest)
        except Exception as exc:
            raise HubError(f"download of {f.path} failed: {exc}; run the pull again to resume") from exc
    problems = [f"{f.path}: missing after its download" for f in todo if not (dest / f.path).is_file()]
    problems += check_files(dest, [f.path for f in todo], deep=True)
    if problems:
        raise HubError("downloaded files failed verification:\n  " + "\n  ".join(problems))
    say(f"{what}: complete ({len(todo)} downloaded, {len(remote) - len(todo)} already present)")
    return [f.path for f in todo]


def _complete(local: Path, remote: RemoteFile) -> bool:
    """Present with the right size (a partial download is never the right size; sha256 checked after)."""
    return local.is_file() and remote.size is not None and local.stat().st_size == remote.size


def _write_manifest(dest: Path, repo_id: str, files: list[RemoteFile]) -> None:
    body = {"repo_id": repo_id, "files": {f.path: asdict(f) for f in files}}
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, dest / MANIFEST)


# ---------------------------------------------------------------------------------------------- verify


def verify(family: str, ckpt_dir: Path | str, deep: bool = False, only: list[str] | None = None) -> list[str]:
    """Problems with an installed checkpoint, one line each naming the file; [] when all is well.

    Always: every needed file present, safetensors headers consistent with the file size (truncation).
    With the pull manifest: sizes match the Hub's; deep=True also recomputes sha256 of LFS files.
    """
    root = Path(ckpt_dir)
    problems = [f"{rel}: missing" for rel in check_installed(family, root)]
    if problems and not root.is_dir():
        return problems
    rels = only if only is not None else _present_files(family, root, _read_manifest(root))
    return problems + check_files(root, rels, deep)


def check_files(root: Path | str, rels: list[str], deep: bool = False) -> list[str]:
    """Integrity of the given files under root (absent ones are skipped): size against the pull manifest,
    safetensors header against the file size, and with deep=True sha256 against the manifest."""
    root = Path(root)
    recorded = _read_manifest(root)
    problems = []
    for rel in sorted(rels):
        path = root / rel
        if not path.is_file():
            continue
        expected = recorded.get(rel)
        if expected is not None and expected.size is not None and path.stat().st_size != expected.size:
            problems.append(f"{rel}: size {path.stat().st_size} bytes, the Hub says {expected.size}")
            continue
        if rel.endswith(".safetensors"):
            trouble = safetensors_trouble(path)
            if trouble:
                problems.append(f"{rel}: {trouble}")
                continue
        if deep and expected is not None and expected.sha256:
            digest = file_sha256(path)
            if digest != expected.sha256:
                problems.append(f"{rel}: sha256 {digest[:16]}..., the Hub says {expected.sha256[:16]}...")
    return problems


def _present_files(family: str, root: Path, recorded: dict[str, RemoteFile]) -> list[str]:
    from pipeline.weights.layouts import required_files

    return sorted(set(required_files(family, root)) | set(recorded))


def _read_manifest(root: Path) -> dict[str, RemoteFile]:
    try:
        body = json.loads((root / MANIFEST).read_text())
        return {k: RemoteFile(**v) for k, v in body["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def safetensors_trouble(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, bad header), read from its header alone; None if fine."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                return f"truncated: header of {header_len} bytes in a {size}-byte file"
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError) as exc:
        return f"not a safetensors file ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    data = size - 8 - header_len
    if ends and max(ends) > data:
        return f"truncated: tensors need {max(ends)} data bytes, the file has {data}"
    return None


# ---------------------------------------------------------------------------------------------- list


@dataclass(frozen=True)
class InstalledModel:
    family: str
    path: Path
    missing: list[str]
    size_bytes: int

    @property
    def installed(self) -> bool:
        return not self.missing


def list_models(models_dir: Path | str) -> list[InstalledModel]:
    """Each known family with its conventional folder under models_dir (`<models_dir>/<repo name>`)."""
    root = Path(models_dir)
    out = []
    for name, fam in families().items():
        path = root / fam.folder
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
        out.append(InstalledModel(name, path, check_installed(name, path), size))
    return out


def default_dir(models_dir: Path | str, family: str) -> Path:
    return Path(models_dir) / get_family(family).folder


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------------------------- CLI entry points


def main_pull(family: str, dest: Path, hub: Hub | None = None) -> int:
    """`wanbox models pull FAMILY DEST`: 0 when complete and verified, 1 otherwise (reason on stderr)."""
    try:
        pull(family, dest, hub)
    except (HubError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_pull_loras(pack: str, library: Path, hub: Hub | None = None) -> int:
    """`wanbox models pull --lora PACK`: 0 when the LoRA files are complete and verified in the library, 1 otherwise."""
    try:
        pull_loras(pack, library, hub)
    except (HubError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_verify_loras(pack: str, library: Path, deep: bool = False) -> int:
    """`wanbox models verify --lora PACK`: 0 when the pack's files are in the library and intact, 1 otherwise."""
    found = get_pack(pack)
    root = Path(library) / found.folder
    problems = [f"{path}: missing" for path in found.files if not (root / path).is_file()]
    problems += check_files(root, list(found.files), deep)
    for line in problems:
        print(f"{pack}: {line}")
    print(f"{pack}: {'OK' if not problems else f'{len(problems)} problem(s)'} in {root}")
    return 0 if not problems else 1


def main_verify(family: str, dest: Path, deep: bool = False) -> int:
    """`wanbox models verify FAMILY DIR [--deep]`: 0 when every file is present and intact, 1 otherwise."""
    try:
        problems = verify(family, dest, deep=deep)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in problems:
        print(f"{family}: {line}")
    print(f"{family}: {'OK' if not problems else f'{len(problems)} problem(s)'} in {dest}"
          + (" (sha256 checked)" if deep and not problems else ""))
    return 0 if not problems else 1


def main_list(models_dir: Path) -> int:
    """`wanbox models list`: one line per family: installed / incomplete / absent, with size."""
    for model in list_models(models_dir):
        if model.installed:
            state = f"installed ({human_size(model.size_bytes)})"
        elif model.path.is_dir():
            state = f"incomplete: {len(model.missing)} missing, e.g. {model.missing[0]}"
        else:
            state = f"not installed (wanbox models pull {model.family})"
        print(f"{model.family:12s} {model.path}  {state}")
    return 0
