"""The one error LoRA files and their application raise: which file, read as which format, what is wrong.

Must not decide anything: it renders a message once, the same in the log, the CLI and error.txt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SHOWN = 5  # keys listed in a message before "... (N in all)"


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model; nothing has been applied when it is raised.

    `file` is the LoRA file, `format` what it was read as ("" before the keys were seen), `detail` the reason.
    """

    def __init__(self, file: str | Path, detail: str, format: str = "") -> None:
        self.file, self.detail, self.format = str(file), detail, format
        read_as = f" (read as {format} LoRA)" if format else ""
        super().__init__(f"{self.file}{read_as}: {detail}")


def some(items: Sequence[str], shown: int = SHOWN) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)': the first few of a long list, and how many there are."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head}, ... ({len(items)} in all)"
