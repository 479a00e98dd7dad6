"""`wanbox validate FILE` / `python -m inbox_schema FILE`: check a manifest before dropping it.

Prints the resolved job as JSON (exit 0) or every problem (exit 2); missing or different input
files are warnings, because the daemon waits for uploads. It must not change any file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from inbox_schema.checks import input_problems
from inbox_schema.errors import ManifestInvalid
from inbox_schema.job import Job
from inbox_schema.jsonschema import json_schema_text
from inbox_schema.manifest import load_manifest
from inbox_schema.presets import PRESETS

EXIT_OK = 0
EXIT_INVALID = 2


def input_warnings(job: Job, verify_sha256: bool = True) -> list[str]:
    """What would keep the job waiting in `staged`, one line each (see checks.input_problems)."""
    return [str(problem) for problem in input_problems(job, verify_sha256)]


def media_problems(job: Job) -> list[str]:
    """Inputs that are present but not usable media (a truncated JPEG, a video without frames): decoded here."""
    from pipeline.preprocess.media import media_problem  # the pipeline's own decoders, no torch

    found = []
    for role in job.spec.inputs:
        item = job.inputs.get(role.name)
        if item is not None and item.path.is_file():
            problem = media_problem(item.path, role.media, repr(item.relpath))
            if problem:
                found.append(f"inputs.{role.name}: {problem}")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanbox validate", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", type=Path, help="the job manifest (TOML)")
    parser.add_argument("--inbox-root", type=Path, default=None,
                        help="the inbox the inputs must stay inside (default: the manifest's folder)")
    parser.add_argument("--no-check-inputs", action="store_true",
                        help="check the manifest text only, not the input files on disk")
    parser.add_argument("--lora-library", type=Path, default=None,
                        help="the server's LoRA library (<models>/loras): check [[lora]] library names against it")
    parser.add_argument("--json-schema", action="store_true", help="print the manifest's JSON Schema and exit")
    return parser


def notes(job: Job, library_checked: bool) -> list[str]:
    """What a person should know about a valid job before dropping it (stderr of `wanbox validate`)."""
    found = []
    if job.seed is None:
        found.append("no sampling.seed: a random seed is drawn and recorded when the job is accepted")
    preset = PRESETS.get(job.sampling.preset or "")
    if preset is not None:
        s = job.sampling
        found.append(f"sampling.preset {preset.name} resolved to steps {s.steps}, solver {s.solver}, shift {s.shift:g}, "
                     f"guide_scale {s.guide_scale}" + (f", timesteps {list(s.timesteps)}" if s.timesteps else "")
                     + (f", boundary {s.boundary:g}" if s.boundary is not None else "") + " (fields you set win)")
        if not job.loras:
            found.append(f"sampling.preset {preset.name} expects its distillation LoRAs ({preset.loras}); this job "
                         "lists no [[lora]], so the base model runs with 4 steps and looks unfinished")
    if any(lora.source == "library" for lora in job.loras) and not library_checked:
        found.append("[[lora]] library names were checked as text only: the daemon checks them against its library "
                     "(pass --lora-library DIR to check now)")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json_schema:
        sys.stdout.write(json_schema_text())
        return EXIT_OK
    if args.manifest is None:
        parser.error("give the manifest to check, e.g. wanbox validate inbox/cat.toml")
    check = not args.no_check_inputs
    try:
        job = load_manifest(args.manifest, args.inbox_root, check_inputs=check, lora_library=args.lora_library)
    except ManifestInvalid as invalid:
        print(str(invalid), file=sys.stderr)
        return EXIT_INVALID
    for warning in input_warnings(job) if check else []:
        print(f"warning: {warning}", file=sys.stderr)
    broken = media_problems(job) if check else []
    if broken:
        print(f"{args.manifest.name}: {len(broken)} input file(s) cannot be used:", file=sys.stderr)
        for problem in broken:
            print(f"  {problem}; upload a complete file under that name", file=sys.stderr)
        return EXIT_INVALID
    for note in notes(job, args.lora_library is not None):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(job.to_dict(), indent=2, ensure_ascii=False))
    return EXIT_OK
