"""The daemon's configuration: one TOML file with documented defaults, resolved to absolute paths.

Reads and checks settings only; it must not create directories, open the ledger or start anything.
Unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from inbox_schema import model_folders
from inbox_schema.loras import LIBRARY_FOLDER as LORA_LIBRARY_FOLDER
from inbox_schema.notify import NOTIFY_EVENTS, webhook_url_problem

SYSTEM_CONFIG = Path("/etc/wanbox/config.toml")
DEFAULT_ROOT = Path("/var/lib/wanbox")

# `{python}` is this interpreter, so the pool runs in the daemon's environment without relying on PATH.
DEFAULT_WORKER_COMMAND = (
    "{python}", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "{nproc}",
    "-m", "pipeline.worker", "--model", "{model}", "--socket", "{socket}",
    "--checkpoint-dir", "{checkpoint_dir}", "--device", "{device}", "--crf", "{crf}",
)


class ConfigError(ValueError):
    """A setting that is wrong: names the file, the key, the value and what was expected."""


@dataclass(frozen=True)
class Paths:
    root: Path
    inbox: Path
    outbox: Path
    failed: Path
    work: Path
    state: Path
    ledger: Path | str  # a file path (SQLite) or a database URL
    socket: Path


@dataclass(frozen=True)
class InboxSettings:
    settle_seconds: float = 5.0  # size and mtime unchanged this long = the upload finished
    staged_deadline_seconds: float = 3600.0  # a job whose inputs never become complete is rejected then
    rescan_seconds: float = 30.0  # full rescan even with inotify (it can overflow; NFS/SMB send nothing)
    polling: bool = False  # poll instead of inotify (network shares)
    dedupe: str = "skip"  # "skip": reject an identical resubmission; "run": run it again


MIN_LEASE_SECONDS = 3.0  # three heartbeats at the fastest pace (heartbeat.lease_heartbeat)


@dataclass(frozen=True)
class JobSettings:
    max_attempts: int = 3
    backoff_base_seconds: float = 30.0  # retry after base * 2**(attempts-1) ...
    backoff_cap_seconds: float = 3600.0  # ... but never later than this
    tick_seconds: float = 0.5  # the supervisor loop's pace when idle
    prune_after_days: float = 0.0  # delete a delivered job's work folder (inputs, intermediates) after this (0 = keep)
    resume: bool = True  # checkpoint the denoising loop in work/<id>/resume/: a retried job resumes there
    checkpoint_every_seconds: float = 120.0  # ... at most this long apart (0 = not by time)
    checkpoint_every_steps: int = 0  # ... or every this many steps (0 = not by count)
    # How long a host holds a running job without renewing its lease (its heartbeat renews it every few seconds);
    # after that, another host sharing the ledger takes the job back (it died, froze or lost the database).
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class PoolSettings:
    nproc: int = 1  # processes (GPUs) in the torchrun pool
    gpus: str = "all"  # "all" or a CUDA_VISIBLE_DEVICES list like "0,1"
    device: str = "cuda"  # "cuda" or "cpu" (tiny models, tests, the demo)
    command: tuple[str, ...] = DEFAULT_WORKER_COMMAND
    env: dict[str, str] = field(default_factory=dict)  # added to the worker's environment
    models_dir: Path = DEFAULT_ROOT / "models"
    checkpoint_dirs: dict[str, Path] = field(default_factory=dict)  # family -> dir; default models_dir/<name>
    heartbeat_seconds: float = 300.0  # a running job silent this long = hung pool
    load_deadline_seconds: float = 1800.0  # loading the models may take this long before hello+ready
    relaunch_base_seconds: float = 5.0  # relaunch backoff after a pool death, doubling ...
    relaunch_cap_seconds: float = 300.0  # ... up to this
    stop_grace_seconds: float = 60.0  # on shutdown/switch, wait this long before SIGTERM, then SIGKILL
    max_switch_wait_seconds: float = 1800.0  # a job of another model waits at most this long
    preload: str = ""  # a model to load at start-up (systemd READY=1 then waits for it); "" = on demand
    max_area: int = 0  # cap on every job's pixel area, passed as the worker's --max-area (0 = no cap); CPU, demos
    threads: int = 0  # torch intra-op threads per worker process, as OMP_NUM_THREADS (0 = torch's default)
    precision: str = "bf16"  # "fp8": the DiT blocks' Linears in float8 (Ada/Hopper+; lossy, bench/RESULTS.md)
    fp8_attention: bool = False  # with fp8, FlashAttention-3's FP8 attention too (faster, lossier still)

    def checkpoint_dir(self, model: str) -> Path:
        return self.checkpoint_dirs.get(model, self.models_dir / model_folders().get(model, model))

    @property
    def lora_library(self) -> Path:
        """The LoRA library manifests name files of ([[lora]] library = "..."): <models_dir>/loras."""
        return self.models_dir / LORA_LIBRARY_FOLDER


@dataclass(frozen=True)
class PreprocessSettings:
    workers: int = 2  # CPU processes preparing the next jobs while the GPUs sample
    mediapipe_dir: Path = Path("models/mediapipe")  # the animate preprocessing's mediapipe task files
    pose_model: str = "heavy"  # mediapipe pose landmarker: "heavy" (most accurate) or "full" (faster)
    max_area: int = 0  # cap on the animate resolution area in pixels (0 = the manifest's size); tiny models, demos
    stall_seconds: float = 900.0  # a preparation with no progress this long is stuck: killed, retried (0 = never)


@dataclass(frozen=True)
class OutboxSettings:
    poster: bool = True  # write <name>.jpg, the first frame
    crf: int = 18  # H.264 quality of the delivered mp4 (lower = better, bigger)




@dataclass(frozen=True)
class NotifySettings:
    urls: tuple[str, ...] = ()  # webhooks POSTed a signed JSON body when a job ends (every job)
    events: tuple[str, ...] = NOTIFY_EVENTS  # which end states the server's webhooks are sent for
    secret: str = ""  # HMAC-SHA256 key signing every webhook body (X-Wanbox-Signature); "" = unsigned
    job_urls: bool = True  # honour the webhook URLs a manifest's [notify] names (false: server URLs only)
    timeout_seconds: float = 10.0  # one webhook request may take this long
    retry_base_seconds: float = 30.0  # a failed delivery is retried after base * 2**(attempt-1) ...
    retry_cap_seconds: float = 3600.0  # ... but never later than this
    give_up_after_seconds: float = 86400.0  # stop retrying this long after the job ended (reason recorded)
    command: tuple[str, ...] = ()  # post-job command (argv, no shell), the job's facts in WANBOX_* variables
    command_events: tuple[str, ...] = NOTIFY_EVENTS  # which end states run the command
    command_timeout_seconds: float = 60.0  # the command (and its children) is killed after this


@dataclass(frozen=True)
class WebSettings:
    enabled: bool = False  # serve the status page, the JSON API and /metrics from `wanbox serve`
    bind: str = "127.0.0.1"  # this host only; "0.0.0.0" / "::" (every interface) only when set here
    port: int = 8790  # 0 = any free port (tests); the URL is logged and shown by `wanbox status`
    token: str = ""  # "" = read-only; else cancel/retry need the header "Authorization: Bearer <token>"
    metrics: bool = True  # Prometheus metrics at /metrics (read-only, no token)
    recent: int = 20  # how many delivered and failed jobs the page lists


@dataclass(frozen=True)
class Config:
    paths: Paths
    inbox: InboxSettings = InboxSettings()
    jobs: JobSettings = JobSettings()
    pool: PoolSettings = PoolSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    outbox: OutboxSettings = OutboxSettings()
    web: WebSettings = WebSettings()
    notify: NotifySettings = NotifySettings()
    source: Path | None = None  # the file it came from, for messages
    found: str = ""  # how that file was found (find_config), for `wanbox doctor`

    @property
    def all_dirs(self) -> list[Path]:
        p = self.paths
        return [p.inbox, p.outbox, p.failed, p.work, p.state]


_SECTIONS: dict[str, type] = {
    "inbox": InboxSettings,
    "jobs": JobSettings,
    "pool": PoolSettings,
    "preprocess": PreprocessSettings,
    "outbox": OutboxSettings,
    "web": WebSettings,
    "notify": NotifySettings,
}
_PATH_KEYS = ("root", "inbox", "outbox", "failed", "work", "state", "ledger", "socket")


def _where(source: Path | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _unknown(source: Path | None, key: str, allowed: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{_where(source, key)}: unknown key{hint}; expected one of {', '.join(allowed)}")


def _coerce(source: Path | None, key: str, value: Any, default: Any) -> Any:
    """The value converted to the default's type, or ConfigError saying what was expected."""
    expected = type(default)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and not isinstance(value, bool):
        if isinstance(value, (int, float)) and value >= 0:
            if isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"{_where(source, key)} = {value!r}: expected a whole number")
            return expected(value)
        if isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)} = {value!r}: expected a number >= 0")
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, Path) and isinstance(value, str):
        return Path(value)
    elif isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    elif isinstance(default, dict) and isinstance(value, dict):
        return {str(k): (Path(v) if key.endswith("checkpoint_dirs") else str(v)) for k, v in value.items()}
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             tuple: "a list of strings", dict: "a table"}
    want = names.get(expected, "a path string" if isinstance(default, Path) else expected.__name__)
    raise ConfigError(f"{_where(source, key)} = {value!r}: expected {want}")


def _section(source: Path | None, name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{_where(source, name)}: expected a table [{name}], got {table!r}")
    defaults = cls()
    allowed = [f.name for f in fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in allowed:
            raise _unknown(source, f"{name}.{key}", allowed)
        values[key] = _coerce(source, f"{name}.{key}", value, getattr(defaults, key))
    return replace(defaults, **values)


def _check_choices(cfg: Config) -> None:
    where = cfg.source
    if cfg.inbox.dedupe not in ("skip", "run"):
        raise ConfigError(f"{_where(where, 'inbox.dedupe')} = {cfg.inbox.dedupe!r}: expected \"skip\" or \"run\"")
    if cfg.pool.device not in ("cuda", "cpu"):
        raise ConfigError(f"{_where(where, 'pool.device')} = {cfg.pool.device!r}: expected \"cuda\" or \"cpu\"")
    if cfg.pool.nproc < 1:
        raise ConfigError(f"{_where(where, 'pool.nproc')} = {cfg.pool.nproc}: expected at least 1")
    if cfg.jobs.max_attempts < 1:
        raise ConfigError(f"{_where(where, 'jobs.max_attempts')} = {cfg.jobs.max_attempts}: expected at least 1")
    if cfg.jobs.lease_seconds < MIN_LEASE_SECONDS:
        raise ConfigError(f"{_where(where, 'jobs.lease_seconds')} = {cfg.jobs.lease_seconds:g}: expected at least "
                          f"{MIN_LEASE_SECONDS:g} (seconds; the heartbeat renews leases every few seconds)")
    if not 0 <= cfg.outbox.crf <= 51:
        raise ConfigError(f"{_where(where, 'outbox.crf')} = {cfg.outbox.crf}: expected 0..51 (H.264 crf)")
    if cfg.preprocess.pose_model not in ("heavy", "full"):
        raise ConfigError(f"{_where(where, 'preprocess.pose_model')} = {cfg.preprocess.pose_model!r}: "
                          "expected \"heavy\" or \"full\"")
    if cfg.preprocess.max_area < 0:
        raise ConfigError(f"{_where(where, 'preprocess.max_area')} = {cfg.preprocess.max_area}: expected >= 0")
    if cfg.preprocess.workers < 1:
        raise ConfigError(f"{_where(where, 'preprocess.workers')} = {cfg.preprocess.workers}: expected >= 1")
    models = list(model_folders())
    for model in cfg.pool.checkpoint_dirs:
        if model not in models:
            raise _unknown(where, f"pool.checkpoint_dirs.{model}", models)
    if cfg.pool.preload and cfg.pool.preload not in models:
        raise ConfigError(f"{_where(where, 'pool.preload')} = {cfg.pool.preload!r}: expected \"\" (load on "
                          f"demand) or one of {', '.join(models)}")
    if not 1 <= cfg.web.port <= 65535 and cfg.web.port != 0:
        raise ConfigError(f"{_where(where, 'web.port')} = {cfg.web.port}: expected a TCP port 1..65535 (0: any free one)")
    if not cfg.web.bind.strip():
        raise ConfigError(f"{_where(where, 'web.bind')} = {cfg.web.bind!r}: expected an address such as \"127.0.0.1\"")
    if cfg.pool.precision not in ("bf16", "fp8"):
        raise ConfigError(f"{_where(where, 'pool.precision')} = {cfg.pool.precision!r}: expected \"bf16\" or \"fp8\"")
    if cfg.pool.fp8_attention and cfg.pool.precision != "fp8":
        raise ConfigError(f"{_where(where, 'pool.fp8_attention')} = true: expected false unless "
                          "pool.precision = \"fp8\"")
    if not cfg.pool.command:
        raise ConfigError(f"{_where(where, 'pool.command')}: expected a non-empty list of strings")
    _check_notify(cfg.notify, where)


def _check_notify(notify: NotifySettings, where: Path | None) -> None:
    for key in ("events", "command_events"):
        for event in getattr(notify, key):
            if event not in NOTIFY_EVENTS:
                raise ConfigError(f"{_where(where, 'notify.' + key)}: {event!r} is not an end state; expected "
                                  f"some of {', '.join(NOTIFY_EVENTS)}")
    for url in notify.urls:
        problem = webhook_url_problem(url)
        if problem:
            raise ConfigError(f"{_where(where, 'notify.urls')}: {url!r}: {problem}")
    if notify.timeout_seconds <= 0 or notify.command_timeout_seconds <= 0:
        raise ConfigError(f"{_where(where, 'notify')}: timeout_seconds and command_timeout_seconds must be > 0")


def _paths(source: Path | None, table: Any, root_override: Path | None) -> Paths:
    if not isinstance(table, dict):
        raise ConfigError(f"{_where(source, 'paths')}: expected a table [paths], got {table!r}")
    for key, value in table.items():
        if key not in _PATH_KEYS:
            raise _unknown(source, f"paths.{key}", list(_PATH_KEYS))
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{_where(source, 'paths.' + key)} = {value!r}: expected a non-empty path string")
    base = source.parent if source else Path.cwd()
    root = root_override or Path(table.get("root", DEFAULT_ROOT))
    root = (base / root).resolve() if not root.is_absolute() else root

    def under(key: str, default: str) -> Path:
        path = Path(table.get(key, default))
        return path if path.is_absolute() else root / path

    state = under("state", "state")
    ledger_value = table.get("ledger")
    socket_value = table.get("socket")
    return Paths(
        root=root,
        inbox=under("inbox", "inbox"),
        outbox=under("outbox", "outbox"),
        failed=under("failed", "failed"),
        work=under("work", "work"),
        state=state,
        ledger=_ledger_location(root, state, ledger_value),
        socket=(root / socket_value) if socket_value and not Path(socket_value).is_absolute()
        else Path(socket_value) if socket_value else state / "pool.sock",
    )


def _ledger_location(root: Path, state: Path, value: str | None) -> Path | str:
    """A database URL stays a string (PostgreSQL); a path is resolved under the root."""
    if not value:
        return state / "wanbox.db"
    if "://" in value:
        return value
    return Path(value) if Path(value).is_absolute() else root / value


def parse_config(data: dict[str, Any], source: Path | None = None, root: Path | None = None) -> Config:
    """A Config from a parsed TOML document (tables: paths, inbox, jobs, pool, preprocess, outbox, web, notify)."""
    allowed = ["paths", *_SECTIONS]
    for key in data:
        if key not in allowed:
            raise _unknown(source, key, allowed)
    sections = {name: _section(source, name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    paths = _paths(source, data.get("paths", {}), root)
    pool = sections["pool"]
    # Relative model paths live under the root, like every other data path.
    models_dir = Path(data.get("pool", {}).get("models_dir", "models"))
    pool = replace(pool, models_dir=models_dir if models_dir.is_absolute() else paths.root / models_dir)
    dirs = {k: (v if v.is_absolute() else paths.root / v) for k, v in pool.checkpoint_dirs.items()}
    sections["pool"] = replace(pool, checkpoint_dirs=dirs)
    prep = sections["preprocess"]
    if not prep.mediapipe_dir.is_absolute():
        sections["preprocess"] = replace(prep, mediapipe_dir=paths.root / prep.mediapipe_dir)
    cfg = Config(paths=paths, source=source, **sections)
    _check_choices(cfg)
    return cfg


ROOT_CONFIG = "config.toml"  # <root>/config.toml, read when the root is known and no --config is given
LOOKUP_ORDER = f"--config FILE, else <root>/{ROOT_CONFIG} (--root or WANBOX_ROOT), else {SYSTEM_CONFIG}"


def find_config(path: Path | None = None, root: Path | None = None) -> tuple[Path | None, str]:
    """The config file `load_config` reads (None: built-in defaults) and how it was found, in LOOKUP_ORDER.

    A known root never falls back to the system file: that one may name another root's ledger.
    """
    if path is not None:
        return Path(path), "given with --config"
    env_root = os.environ.get("WANBOX_ROOT")
    known_root = root or (Path(env_root) if env_root else None)
    if known_root is not None:
        candidate = known_root / ROOT_CONFIG
        if candidate.is_file():
            return candidate, f"the root's {ROOT_CONFIG}"
        return None, f"built-in defaults (no {candidate})"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "the system config"
    return None, f"built-in defaults (no {SYSTEM_CONFIG})"


def load_config(path: Path | None = None, root: Path | None = None) -> Config:
    """The config found by `find_config`, with `root` overriding paths.root.

    With no file, the root is `root`, else WANBOX_ROOT, else /var/lib/wanbox. Config.found says how.
    """
    env_root = os.environ.get("WANBOX_ROOT")
    if path is None and root is None and env_root:
        root = Path(env_root)  # the root's own config.toml takes the root it was found in
    file, found = find_config(path, root)
    if file is None:
        return replace(parse_config({}, None, root or DEFAULT_ROOT), found=found)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return replace(parse_config(data, file.resolve(), root.resolve() if root else None), found=found)
