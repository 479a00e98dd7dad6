"""Resolved jobs for tests that talk to the pool directly: made by the real manifest parser, seeded as at acceptance.

Only for tests; the daemon makes its jobs from the inbox.
"""

from __future__ import annotations

from pathlib import Path

from inbox_schema import Job, parse_manifest_text


def resolved_job(kind: str = "i2v", *, name: str = "job", prompt: str | None = "a lighthouse at dusk",
                 size: str = "832*480", frames: int | None = 5, fps: int | None = 16, steps: int = 2, seed: int = 42,
                 guide: str = "", sampling: str = "", animate: str = "", inputs: dict[str, str] | None = None) -> Job:
    """A job of `kind` as `parse_manifest_text` resolves it; `sampling`/`animate` are extra TOML lines."""
    files = inputs or ({"image": "cat.jpg"} if kind == "i2v" else {"character": "hero.png", "video": "dance.mp4"})
    lines = ["schema = 1", f'kind = "{kind}"', f'name = "{name}"']
    if prompt is not None:
        lines.append(f'prompt = "{prompt}"')
    lines += ["[inputs]", *(f'{role} = "{path}"' for role, path in files.items())]
    lines += ["[video]", f'size = "{size}"']
    lines += [f"frames = {frames}"] if frames is not None else []
    lines += [f"fps = {fps}"] if fps is not None else []
    lines += ["[sampling]", f"steps = {steps}", f"seed = {seed}"]
    lines += [f"guide_scale = {guide}"] if guide else []
    lines += [sampling] if sampling else []
    lines += ["[animate]", animate] if animate else []
    return parse_manifest_text("\n".join(lines) + "\n", f"{name}.toml", Path("/inbox"), check_inputs=False)
