"""`wanbox doctor`: checks that a host can run the daemon (paths, permissions, disk, GPUs, models, RAM, ledger).

Read-only: it creates, moves and deletes nothing, and must not import torch (GPUs via nvidia-smi).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon import protocol
from daemon.config import LOOKUP_ORDER, Config
from inbox_schema import model_ids

MIN_FREE_GIB = 20  # one 720p job's intermediates plus room for outputs; below it, warn
CRITICAL_FREE_GIB = 2
PAGE_CACHE_HEADROOM_GIB = 16  # RAM for the daemon, preprocessing and the OS beside the cached weight files


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_dirs(cfg: Config) -> list[Check]:
    found = []
    for label in ("inbox", "outbox", "failed", "work", "state"):
        path: Path = getattr(cfg.paths, label)
        if path.is_dir():
            ok = os.access(path, os.W_OK | os.X_OK)
            found.append(Check(f"{label} dir", "ok" if ok else "fail",
                               f"{path}" + ("" if ok else " is not writable by this user")))
        else:
            parent = _nearest_existing(path)
            ok = os.access(parent, os.W_OK)
            found.append(Check(f"{label} dir", "warn" if ok else "fail",
                               f"{path} does not exist yet" + (" (serve creates it)" if ok else
                                                               f"; {parent} is not writable")))
    return found


def check_same_filesystem(cfg: Config) -> Check:
    """inbox and work must share a filesystem, so that accepting a job is a rename, not a copy."""
    try:
        inbox_dev = os.stat(_nearest_existing(cfg.paths.inbox)).st_dev
        work_dev = os.stat(_nearest_existing(cfg.paths.work)).st_dev
    except OSError as exc:
        return Check("inbox/work filesystem", "warn", str(exc))
    if inbox_dev == work_dev:
        return Check("inbox/work filesystem", "ok", "same filesystem: accepting a job is a rename")
    return Check("inbox/work filesystem", "warn", "different filesystems: accepted inputs are copied (slower)")


def check_disk(cfg: Config) -> Check:
    usage = shutil.disk_usage(_nearest_existing(cfg.paths.root))
    free_gib = usage.free / 2**30
    status = "fail" if free_gib < CRITICAL_FREE_GIB else "warn" if free_gib < MIN_FREE_GIB else "ok"
    return Check("free disk", status, f"{free_gib:.1f} GiB free under {cfg.paths.root}")


def _meminfo_gib() -> dict[str, float] | None:
    """/proc/meminfo in GiB (MemTotal, MemAvailable, ...); None where it cannot be read."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in lines if line.split()[1:]}


def check_memory() -> Check:
    info = _meminfo_gib()
    if info is None:
        return Check("memory", "warn", "cannot read /proc/meminfo")
    total, available = info.get("MemTotal", 0.0), info.get("MemAvailable", 0.0)
    status = "warn" if total < 64 else "ok"
    return Check("memory", status, f"{total:.0f} GiB total, {available:.0f} GiB available"
                 + (" (14B models want 64+ GiB of host RAM to load)" if status == "warn" else ""))


HOPPER_NAMES = ("H100", "H200", "H800", "H20", "GH200")  # compute capability 9.0: FlashAttention-3's GPUs


def check_attention(cfg: Config, gpus: Check) -> Check:
    """Which attention kernel the worker can use; FlashAttention-3 is optional but ~12% faster on Hopper."""
    if cfg.pool.device != "cuda":
        return Check("attention kernel", "ok", "torch SDPA on the CPU (pool.device = cpu)")
    # Looked up, not imported: doctor must not import torch. The default worker runs this same interpreter.
    if importlib.util.find_spec("flash_attn_interface") is not None:
        return Check("attention kernel", "ok", "FlashAttention-3 found: the worker uses it after its self-test")
    hopper = gpus.status == "ok" and any(name in gpus.detail for name in HOPPER_NAMES)
    detail = "FlashAttention-3 not installed: torch's cuDNN attention is used"
    if hopper:
        detail += ("; on this Hopper GPU a 720p forward takes ~13% longer than with FlashAttention-3 "
                   "(README: 'Faster attention on Hopper' builds it in ~2 minutes)")  # fmt: skip
    return Check("attention kernel", "warn" if hopper else "ok", detail)


def check_gpus(cfg: Config) -> Check:
    smi = shutil.which("nvidia-smi")
    wanted = "fail" if cfg.pool.device == "cuda" else "ok"
    if smi is None:
        return Check("GPUs", wanted, "nvidia-smi not found" + (" but pool.device = cuda" if wanted == "fail" else
                                                                 " (pool.device = cpu)"))
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return Check("GPUs", wanted, f"nvidia-smi failed: {exc}")
    gpus = [line.strip() for line in out.splitlines() if line.strip()]
    if len(gpus) < cfg.pool.nproc and cfg.pool.device == "cuda":
        return Check("GPUs", "fail", f"{len(gpus)} GPU(s), but pool.nproc = {cfg.pool.nproc}: {gpus}")
    return Check("GPUs", "ok", f"{len(gpus)}: " + "; ".join(gpus))


def check_models(cfg: Config) -> list[Check]:
    try:
        from pipeline.weights.layouts import check_installed
    except ImportError:
        check_installed = None
    found = []
    for family in model_ids():
        path = cfg.pool.checkpoint_dir(family)
        if check_installed is None:
            ok = path.is_dir() and any(path.iterdir())
            found.append(Check(f"model {family}", "ok" if ok else "warn",
                               f"{path}" + ("" if ok else f" is missing: wanbox models pull {family}")))
            continue
        try:
            missing = check_installed(family, path)
        except Exception as exc:  # a broken checkpoint dir must not crash doctor
            missing = [f"{type(exc).__name__}: {exc}"]
        detail = f"{path}" if not missing else (
            f"{path}: {len(missing)} file(s) missing, e.g. {missing[0]}; run `wanbox models pull {family}`")
        found.append(Check(f"model {family}", "warn" if missing else "ok", detail))
    mediapipe = cfg.preprocess.mediapipe_dir
    has_tasks = mediapipe.is_dir() and any(mediapipe.glob("*.task"))
    found.append(Check("animate preprocessing models", "ok" if has_tasks else "warn",
                       f"{mediapipe}" + ("" if has_tasks else " has no mediapipe .task files (animate jobs fail)")))
    return found


def check_model_load(cfg: Config) -> list[Check]:
    """Per installed family: how many bytes the pool reads at each start, and whether RAM can cache them.

    A pool (re)start reads every weight file; from the page cache that is fast (both I2V experts reach the
    GPU in ~6.4 s, bench/RESULTS.md), from disk it runs at the disk's speed. So RAM >= the files + headroom.
    """
    try:
        from pipeline.weights.layouts import check_installed, required_files
    except ImportError:
        return []
    info = _meminfo_gib()
    found = []
    for family in model_ids():
        root = cfg.pool.checkpoint_dir(family)
        try:
            if check_installed(family, root):
                continue  # check_models already says what is missing and how to pull it
            size_gib = sum((root / rel).stat().st_size for rel in required_files(family, root)) / 2**30
        except (OSError, ValueError):
            continue
        need = size_gib + PAGE_CACHE_HEADROOM_GIB
        head = f"each pool start reads {size_gib:.1f} GiB of weights from {root}"
        if info is None:
            found.append(Check(f"model {family} load", "warn", f"{head}; RAM unknown (no /proc/meminfo)"))
            continue
        total = info.get("MemTotal", 0.0)
        if total >= need:
            found.append(Check(f"model {family} load", "ok", f"{head}; {total:.0f} GiB of RAM can keep them in the "
                                                              "page cache, so restarts load in seconds"))
            continue
        found.append(Check(f"model {family} load", "warn",
                           f"{head}; {total:.0f} GiB of RAM cannot cache them (needs ~{need:.0f} GiB), so every "
                           f"restart reads them from disk (~{size_gib * 2**30 / 2e9:.0f} s at 2 GB/s)"))
    return found


def check_worker(cfg: Config) -> list[Check]:
    from daemon.pool import WarmPool

    pool = WarmPool(cfg.pool, cfg.paths.socket)
    found = []
    try:
        argv = pool.command(model_ids()[0])
        program = shutil.which(argv[0])
        found.append(Check("worker command", "ok" if program else "fail",
                           " ".join(argv) if program else f"{argv[0]} not found on PATH"))
    except ValueError as exc:
        found.append(Check("worker command", "fail", str(exc)))
    try:
        protocol.check_socket_path(cfg.paths.socket)
        found.append(Check("pool socket", "ok", str(cfg.paths.socket)))
    except ValueError as exc:
        found.append(Check("pool socket", "fail", str(exc)))
    return found


def check_ledger(cfg: Config, clock: Callable[[], float] = time.time) -> list[Check]:
    """The database: reachable, at this wanbox's schema revision, and (PostgreSQL) with a clock that agrees
    with this host's, since leases and retry times written by one host are read by the others."""
    from daemon.ledger import LedgerError
    from daemon.ledger_admin import CLOCK_SKEW_WARN_S, inspect_ledger, missing_sqlite_file

    if (path := missing_sqlite_file(cfg.paths.ledger)) is not None:
        return [Check("ledger", "warn", f"{path} does not exist yet (serve creates it)")]
    try:
        info = inspect_ledger(cfg.paths.ledger, clock)
    except LedgerError as exc:
        return [Check("ledger", "fail", str(exc))]
    found = [Check("ledger", "ok", f"{info.url} ({info.server_version})")]
    if info.revision is None:
        found.append(Check("ledger schema", "warn", f"empty database: serve or `wanbox ledger migrate` "
                                                    f"creates the schema ({info.head})"))  # fmt: skip
    elif not info.up_to_date:
        found.append(Check("ledger schema", "fail", f"revision {info.revision}, this wanbox writes {info.head}: "
                                                    "run `wanbox ledger migrate` (or the wanbox that wrote it)"))
    else:
        found.append(Check("ledger schema", "ok", f"revision {info.revision} (up to date)"))
    if info.clock_skew_s is not None:
        skew = info.clock_skew_s
        detail = f"the database server's clock is {skew:+.3f} s from this host's (±{info.clock_uncertainty_s:.3f} s)"
        if abs(skew) > CLOCK_SKEW_WARN_S:
            detail += f": over {CLOCK_SKEW_WARN_S:g} s, leases and retry times drift; synchronise both (NTP)"
        found.append(Check("ledger clock", "warn" if abs(skew) > CLOCK_SKEW_WARN_S else "ok", detail))
    return found


def run_checks(cfg: Config) -> list[Check]:
    source = f"{cfg.source} ({cfg.found})" if cfg.source else (cfg.found or "built-in defaults")
    source += f"; looked for: {LOOKUP_ORDER}"
    gpus = check_gpus(cfg)
    return [
        Check("config", "ok", source),
        *check_dirs(cfg),
        check_same_filesystem(cfg),
        check_disk(cfg),
        check_memory(),
        gpus,
        check_attention(cfg, gpus),
        *check_models(cfg),
        *check_model_load(cfg),
        *check_worker(cfg),
        *check_ledger(cfg),
    ]
