"""The manifest fuzzer: over a thousand seeded hostile manifests through validation (`load_manifest` on real files in
a real inbox), then a sample of them through one real daemon.

Each must end accepted, or rejected with errors that each name a field ("manifest" or "toml" for the whole file);
never an unexpected exception, never a daemon crash. The seed is printed on failure: WANBOX_FUZZ_SEED=<seed>
replays the run (WANBOX_FUZZ_COUNT changes how many cases).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import pytest

from inbox_schema import Job, ManifestInvalid, load_manifest, render_errors
from inbox_schema.defaults import NAME_MAX_CHARS, NAME_PATTERN
from inbox_schema.errors import readable
from inbox_schema.vocabulary import vocabulary
from tests.faults.invariants import check_root
from tests.faults.manifest_fuzz import Case, Fuzzer, seed_and_count
from tests.faults.totals import TOTALS
from tests.workers.harness import Root, wait_for, write_image

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SEED, COUNT = seed_and_count(dict(os.environ))
WHOLE_FILE = ("manifest", "toml")
DAEMON_SAMPLE = 30
LIBRARY_FILES = ["style.safetensors", "sub/style.safetensors",
                 "Wan2.2-Lightning/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors",
                 "Wan2.2-Lightning/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model.safetensors",
                 "Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v/loras/"
                 "Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors"]


def replay(what: str) -> str:
    return f"{what}\nreplay with: WANBOX_FUZZ_SEED={SEED} WANBOX_FUZZ_COUNT={COUNT} pytest {__file__}"


# --- the files the manifests name -------------------------------------------------------------------------------

def media(folder: Path, outside: Path) -> None:
    """The inputs the examples and the fuzzer's paths name, plus the traps: links out, a folder, a FIFO."""
    for rel in ("cat.jpg", "media/i2v_input.jpg", "hero.png", "猫.jpg", "e\u0301.jpg"):
        write_image(folder / rel)
    (folder / "dance.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # validation only lstat()s inputs
    (folder / "loras").mkdir(exist_ok=True)
    (folder / "loras" / "style.safetensors").write_bytes(b"lora")
    (folder / "link.jpg").symlink_to(outside / "secret.jpg")
    (folder / "dirlink").symlink_to(outside, target_is_directory=True)
    (folder / "dir.jpg").mkdir()
    os.mkfifo(folder / "pipe.jpg")


def library(root: Path, outside: Path) -> Path:
    for rel in LIBRARY_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"lora")
    (root / "escape.safetensors").symlink_to(outside / "secret.jpg")
    (root / "folder.safetensors").mkdir()
    (root / "loop.safetensors").symlink_to(root / "loop.safetensors")
    (root / "dangling.safetensors").symlink_to(outside / "gone.safetensors")
    return root


def write_case(inbox: Path, case: Case) -> Path:
    path = inbox / case.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(case.data)
    return path


# --- what must hold for one case --------------------------------------------------------------------------------

def names_a_field(field: str, keys: set[str]) -> bool:
    """A whole-file field, or a dotted path that starts at a key the schema has or the manifest wrote."""
    if field in WHOLE_FILE:
        return True
    return any(field == k or field.startswith((k + ".", k + "[")) for k in keys)


def error_problems(exc: ManifestInvalid, raw: bytes, source: str) -> list[str]:
    keys = set(vocabulary().keys(""))
    with contextlib.suppress(UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        keys |= set(tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff")))
    problems = [] if exc.errors else ["ManifestInvalid without any error"]
    for error in exc.errors:
        if not isinstance(error.field, str) or not names_a_field(error.field, keys):
            problems.append(f"error names no field: {error.field!r} ({error})")
        if not isinstance(error.expected, str) or not error.expected.strip() or error.expected.startswith("expected"):
            problems.append(f"error without an expectation: {error!r}")
        if len(str(error)) > 2_000:
            problems.append(f"error of {len(str(error))} characters (unreadable): {str(error)[:200]}...")
    # What error.txt, the log and `wanbox validate --json` write must be UTF-8 text.
    render_errors(exc.errors, source).encode("utf-8")
    str(exc).encode("utf-8")
    json.dumps([e.to_dict() for e in exc.errors], ensure_ascii=False, default=str).encode("utf-8")
    return problems


def job_problems(job: Job, inbox: Path) -> list[str]:
    problems = []
    as_dict = job.to_dict()
    json.dumps(as_dict).encode("utf-8")  # what the ledger stores
    if Job.from_dict(json.loads(json.dumps(as_dict))) != job:
        problems.append("Job.from_dict(job.to_dict()) differs from the job")
    if not re.fullmatch(NAME_PATTERN, job.name) or len(job.name) > NAME_MAX_CHARS:
        problems.append(f"accepted an invalid name {job.name!r}")
    for item in job.files().values():
        if not item.path.resolve().is_relative_to(inbox.resolve()):
            problems.append(f"accepted an input outside the inbox: {item.relpath!r} -> {item.path}")
    return problems


def check_case(case: Case, inbox: Path, lora_library: Path) -> tuple[str, list[str]]:
    """("accepted" | "rejected", problems) for one case on disk."""
    path = inbox / case.relpath
    try:
        job = load_manifest(path, inbox, lora_library=lora_library)
    except ManifestInvalid as exc:
        try:
            return "rejected", error_problems(exc, case.data, case.relpath)
        except Exception:
            return "rejected", [f"its errors cannot be written out:\n{traceback.format_exc()}"]
    except Exception:
        return "crashed", [f"unexpected exception:\n{traceback.format_exc()}"]
    try:
        return "accepted", job_problems(job, inbox)
    except Exception:
        return "accepted", [f"the accepted job does not travel:\n{traceback.format_exc()}"]


# --- the tests ----------------------------------------------------------------------------------------------------

def test_fuzzed_manifests_are_accepted_or_name_a_field(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_image(outside / "secret.jpg")
    inbox = tmp_path / "inbox"
    media(inbox, outside)
    lora_library = library(tmp_path / "loras", outside)
    fuzzer = Fuzzer(SEED)
    started = time.monotonic()
    outcomes: dict[str, int] = {}
    failures = []
    for i in range(COUNT):
        case = fuzzer.case(i)
        write_case(inbox, case)
        outcome, problems = check_case(case, inbox, lora_library)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if problems:
            failures.append(f"{case.describe()}\n  " + "\n  ".join(problems))
    seconds = time.monotonic() - started
    TOTALS.jobs += COUNT
    print(f"manifest fuzz: seed {SEED}, {COUNT} manifests in {seconds:.1f} s: {outcomes}")
    assert not failures, replay(f"{len(failures)} of {COUNT} manifests broke the contract:\n\n"
                                + "\n\n".join(failures[:10]))
    # The fuzzer must reach both ends, or it tests nothing.
    assert outcomes.get("accepted", 0) >= COUNT // 20 and outcomes.get("rejected", 0) >= COUNT // 2, outcomes


@pytest.mark.soak
def test_soak_many_seeds(tmp_path: Path) -> None:
    """20 seeds of 5,000 manifests each (about 5 minutes): the same contract, far more cases."""
    outside = tmp_path / "outside"
    write_image(outside / "secret.jpg")
    inbox = tmp_path / "inbox"
    media(inbox, outside)
    lora_library = library(tmp_path / "loras", outside)
    failures = []
    for seed in range(SEED, SEED + 20):
        fuzzer = Fuzzer(seed)
        for i in range(5_000):
            case = fuzzer.case(i)
            write_case(inbox, case)
            _, problems = check_case(case, inbox, lora_library)
            if problems:
                failures.append(f"seed {seed}: {case.describe()}\n  " + "\n  ".join(problems))
        TOTALS.jobs += 5_000
    assert not failures, "\n\n".join(failures[:10])


def test_fuzz_is_reproducible_from_its_seed() -> None:
    first, again = Fuzzer(SEED), Fuzzer(SEED)
    assert [first.case(i).data for i in range(50)] == [again.case(i).data for i in range(50)]
    assert [Fuzzer(SEED + 1).case(i).data for i in range(50)] != [Fuzzer(SEED).case(i).data for i in range(50)]


def daemon_sample(count: int, scratch: Path, outside: Path, lora_library: Path) -> list[Case]:
    """`count` cases of the run's stream as the daemon will see them (folder fz<NN>/ with the media): a third
    that validate, the rest that do not."""
    fuzzer = Fuzzer(SEED + 7)
    valid: list[Case] = []
    invalid: list[Case] = []
    for i in range(5 * count):
        case = fuzzer.case(i)
        case.relpath = f"fz{i:03d}/job.toml"
        media(scratch / f"fz{i:03d}", outside)
        write_case(scratch, case)
        try:  # accepted i2v jobs go all the way (animate needs pose models that tests do not have)
            ok = load_manifest(scratch / case.relpath, scratch, lora_library=lora_library).kind == "i2v"
        except ManifestInvalid:
            ok = False
        bucket = valid if ok else invalid
        if len(bucket) < (count // 3 if bucket is valid else count - count // 3):
            bucket.append(case)
    return valid + invalid


@pytest.mark.timeout(150)
def test_fuzzed_manifests_through_a_real_daemon(tmp_path: Path) -> None:
    """A sample dropped as folders (manifest + media) into a real daemon: each ends done, or rejected with
    failed/<name>/error.txt; the daemon neither crashes nor logs an internal error."""
    outside = tmp_path / "outside"
    write_image(outside / "secret.jpg")
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "staged_deadline_seconds": 4},
             pool={"models_dir": str(tmp_path / "models")})
    library(tmp_path / "models" / "loras", outside)
    r.knobs({"*": {"step_seconds": 0.001}})
    try:
        r.serve()
        wait_for(lambda: " serving " in r.log_text() or r.proc.poll() is not None, 60, "the daemon did not start")
        assert r.proc.poll() is None, f"the daemon did not start:\n{r.log_text()}"
        cases = daemon_sample(DAEMON_SAMPLE, tmp_path / "scratch", outside, tmp_path / "models" / "loras")
        for case in cases:  # the whole folder appears at once, as `wanbox submit` makes it
            os.rename((tmp_path / "scratch" / case.relpath).parent, (r.inbox / case.relpath).parent)
        odd = [Case(900 + i, f"{stem}.toml", b'schema = 1\nkind = "i2v"\nprompt = "odd name"\n[inputs]\nimage = "cat.jpg"\n',
                    ["odd file name"]) for i, stem in enumerate(["\udcff\udcfe", "名前", "-x", "x" * 120])]
        for case in odd:
            write_case(r.inbox, case)
        cases += odd
        TOTALS.jobs += len(cases)
        # The ledger holds names as UTF-8 text: a name's undecodable bytes as \\xNN (inbox_schema.errors.readable).
        manifests = {readable(str(r.inbox / case.relpath)): (readable(case.relpath), case) for case in cases}

        def ended() -> bool:
            with r.ledger() as ledger:
                found = {row.manifest_path: row for row in ledger.list(limit=None)}
            return all(m in found and found[m].state.value in ("done", "failed", "rejected") for m in manifests)

        wait_for(ended, 120, lambda: f"not every fuzzed job ended\n--- log ---\n{r.log_text()[-4000:]}")
        assert r.proc is not None and r.proc.poll() is None, "the daemon died:\n" + r.log_text()[-4000:]
        with r.ledger() as ledger:
            rows = {row.manifest_path: row for row in ledger.list(limit=None)}
            problems = []
            for manifest, (folder, case) in manifests.items():
                row = rows[manifest]
                failed_dir = Path((row.outputs_json or {}).get("failed_dir") or "/nonexistent")
                if row.state.value == "rejected" and not (failed_dir / "error.txt").is_file():
                    problems.append(f"{folder} rejected without error.txt ({row.last_error}): {case.describe()}")
            totals, broken = check_root(r.root, [rows[m].name for m in manifests], ledger)
        states = {s: sum(1 for m in manifests if rows[m].state.value == s) for s in ("done", "failed", "rejected")}
        print(f"fuzzed manifests through the daemon: {states}")
        TOTALS.add(totals)
        for manifest, (folder, _case) in manifests.items():
            print(f"  {folder[:40]}: {rows[manifest].state.value}: {(rows[manifest].last_error or '')[:150]}")
        assert not problems and not broken, replay("\n".join(problems + broken))
        assert states["done"] >= 4 and states["rejected"] >= 15, states
        assert "internal error while looking at" not in r.log_text(), r.log_text()[-4000:]
        assert "supervisor loop error" not in r.log_text(), r.log_text()[-4000:]
        assert r.stop() == 0
    finally:
        r.cleanup()
        shutil.rmtree(tmp_path / "scratch", ignore_errors=True)
