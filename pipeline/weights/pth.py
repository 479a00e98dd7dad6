"""Read a `torch.save`d file (.pth/.pt/.ckpt/.bin) without running pickled code: zip files memory-mapped,
legacy (non-zip) files read whole.

Must not interpret what the file holds (state dict, wrapper dict): callers do; errors name the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle stream (protocol byte first)


class TorchFileError(ValueError):
    """A torch file that cannot be read; the message names the file, its size and the reader's complaint."""


def load_torch_file(path: str | Path) -> Any:
    """The object stored in `path`, tensors on the CPU (weights_only: plain containers and tensors only).

    The format is told by the first bytes, so that a truncated zip file reports the zip reader's error
    rather than that of a legacy-format retry. Legacy files cannot be memory-mapped: they are read whole.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise TorchFileError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if not head:
        raise TorchFileError(f"{path}: the file is empty (0 bytes); expected a torch.save file")
    legacy = not head.startswith(ZIP_MAGIC)
    if legacy and not head.startswith(PICKLE_MAGIC):
        raise TorchFileError(f"{path}: not a torch.save file (starts with {head!r}; expected a zip archive "
                             f"or a pickle stream)")
    try:
        if legacy:
            return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated/corrupt files raise many different types
        size = path.stat().st_size
        kind = "legacy (non-zip)" if legacy else "zip"
        raise TorchFileError(f"{path}: cannot read this {kind} torch file ({size} bytes): {exc}. It is truncated, "
                             f"corrupt, or holds more than tensors and plain containers") from exc
