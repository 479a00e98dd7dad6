"""The daemon config: documented defaults, paths under the root, and errors naming key, value and expectation.

Real TOML files in tmp_path, parsed by the real loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DEFAULT_WORKER_COMMAND, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_root_only_gives_every_folder_under_it_and_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, tmp_path / "r")
    p = cfg.paths
    assert (p.inbox, p.outbox, p.failed, p.work, p.state) == tuple(
        tmp_path / "r" / n for n in ("inbox", "outbox", "failed", "work", "state"))
    assert p.ledger == tmp_path / "r" / "state" / "wanbox.db"
    assert p.socket == tmp_path / "r" / "state" / "pool.sock"
    assert cfg.inbox.settle_seconds == 5.0 and cfg.inbox.dedupe == "skip" and cfg.jobs.max_attempts == 3
    assert cfg.pool.command == DEFAULT_WORKER_COMMAND and cfg.pool.device == "cuda"
    assert cfg.pool.checkpoint_dir("i2v-A14B") == tmp_path / "r" / "models" / "Wan2.2-I2V-A14B"


def test_overrides_relative_and_absolute_paths_and_root_flag_wins(tmp_path: Path) -> None:
    path = write(tmp_path, """
[paths]
root = "data"
inbox = "/srv/share/in"
ledger = "db/x.db"
[pool]
nproc = 2
models_dir = "/models"
checkpoint_dirs = { "animate-14B" = "anim" }
command = ["worker", "--model", "{model}"]
env = { NCCL_DEBUG = "WARN" }
[inbox]
settle_seconds = 1
polling = true
dedupe = "run"
""")
    cfg = load_config(path)
    assert cfg.paths.root == tmp_path / "data"
    assert cfg.paths.inbox == Path("/srv/share/in")
    assert cfg.paths.ledger == tmp_path / "data" / "db" / "x.db"
    assert cfg.pool.nproc == 2 and cfg.pool.command == ("worker", "--model", "{model}")
    assert cfg.pool.checkpoint_dir("animate-14B") == tmp_path / "data" / "anim"
    assert cfg.pool.checkpoint_dir("i2v-A14B") == Path("/models/Wan2.2-I2V-A14B")
    assert cfg.pool.env == {"NCCL_DEBUG": "WARN"}
    assert cfg.inbox.settle_seconds == 1.0 and isinstance(cfg.inbox.settle_seconds, float)
    assert cfg.inbox.polling is True and cfg.inbox.dedupe == "run"
    assert load_config(path, tmp_path / "other").paths.outbox == tmp_path / "other" / "outbox"


def test_database_url_is_kept_as_is(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[paths]\nledger = "postgresql+psycopg://db/wanbox"\n'))
    assert cfg.paths.ledger == "postgresql+psycopg://db/wanbox"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[inbox]\nsettle_secs = 3\n", ["inbox.settle_secs", "unknown key", "did you mean 'settle_seconds'"]),
        ("[inboxx]\n", ["inboxx", "did you mean 'inbox'"]),
        ("[paths]\nroots = \"/x\"\n", ["paths.roots", "did you mean 'root'"]),
        ("[inbox]\nsettle_seconds = \"5\"\n", ["inbox.settle_seconds = '5'", "expected a number"]),
        ("[inbox]\nsettle_seconds = -1\n", ["inbox.settle_seconds = -1", "expected a number >= 0"]),
        ("[jobs]\nmax_attempts = 2.5\n", ["jobs.max_attempts = 2.5", "whole number"]),
        ("[jobs]\nmax_attempts = 0\n", ["jobs.max_attempts = 0", "at least 1"]),
        ("[inbox]\npolling = 1\n", ["inbox.polling = 1", "true or false"]),
        ("[inbox]\ndedupe = \"never\"\n", ["inbox.dedupe = 'never'", "\"skip\" or \"run\""]),
        ("[pool]\ndevice = \"tpu\"\n", ["pool.device = 'tpu'", "\"cuda\" or \"cpu\""]),
        ("[pool]\ncommand = \"torchrun\"\n", ["pool.command = 'torchrun'", "a list of strings"]),
        ("[pool.checkpoint_dirs]\n\"t2v\" = \"/x\"\n", ["pool.checkpoint_dirs.t2v", "i2v-A14B"]),
        ("[outbox]\ncrf = 60\n", ["outbox.crf = 60", "0..51"]),
        ("[pool]\npreload = \"i2v\"\n", ["pool.preload = 'i2v'", "i2v-A14B, animate-14B"]),
        ("[web]\nport = 70000\n", ["web.port = 70000", "1..65535"]),
        ("[web]\nbind = \" \"\n", ["web.bind", "expected an address"]),
        ("[web]\nenable = true\n", ["web.enable", "did you mean 'enabled'"]),
        ("inbox = 3\n", ["inbox", "expected a table"]),
        ("[inbox\n", ["not valid TOML"]),
        ("inbox = 3\n", ["inbox", "expected a table"]),
        ("[inbox\n", ["not valid TOML"]),
        ("[notify]\nevents = [\"done\", \"finished\"]\n", ["notify.events", "'finished'", "done, failed, rejected"]),
        ("[notify]\ncommand_events = [\"cancelled\"]\n", ["notify.command_events", "'cancelled'"]),
        ("[notify]\nurls = [\"ftp://x/y\"]\n", ["notify.urls", "'ftp://x/y'", "http:// or https://"]),
        ("[notify]\nurls = \"https://x/y\"\n", ["notify.urls", "a list of strings"]),
        ("[notify]\nsecrets = \"k\"\n", ["notify.secrets", "did you mean 'secret'"]),
        ("[notify]\ntimeout_seconds = 0\n", ["notify", "must be > 0"]),
        ("[pool]\nmax_area = 1.5\n", ["pool.max_area = 1.5", "whole number"]),
        ("[pool]\nthreads = -2\n", ["pool.threads = -2", ">= 0"]),
    ],
)
def test_bad_settings_name_the_key_the_value_and_what_was_expected(tmp_path: Path, text: str,
                                                                    needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_the_commented_example_config_is_valid_and_equals_the_defaults() -> None:
    example = load_config(REPO / "systemd" / "config.example.toml")
    defaults = load_config(None, Path("/var/lib/wanbox"))
    assert example.inbox == defaults.inbox and example.jobs == defaults.jobs
    assert example.pool == defaults.pool and example.outbox == defaults.outbox
    assert example.preprocess == defaults.preprocess and example.paths == defaults.paths
    assert example.web == defaults.web
    assert example.notify == defaults.notify


def test_the_web_page_is_off_and_loopback_only_unless_configured(tmp_path: Path) -> None:
    web = load_config(None, tmp_path).web
    assert (web.enabled, web.bind, web.token) == (False, "127.0.0.1", "")
    on = load_config(write(tmp_path, '[web]\nenabled = true\nbind = "0.0.0.0"\nport = 0\ntoken = "t"\n')).web
    assert (on.enabled, on.bind, on.port, on.token) == (True, "0.0.0.0", 0, "t")


def test_notify_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[notify]
urls = ["https://chat.example/hooks/wanbox"]
events = ["failed"]
secret = "k"
command = ["/usr/local/bin/post-job", "--quiet"]
command_timeout_seconds = 5
"""))
    n = cfg.notify
    assert n.urls == ("https://chat.example/hooks/wanbox",) and n.events == ("failed",) and n.secret == "k"
    assert n.command == ("/usr/local/bin/post-job", "--quiet") and n.command_timeout_seconds == 5.0
    assert n.command_events == ("done", "failed", "rejected") and n.job_urls is True
    assert load_config(None, tmp_path / "r").notify.urls == ()


def test_lookup_order_config_flag_then_the_roots_file_then_the_system_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import config as config_module

    system = tmp_path / "etc" / "config.toml"
    system.parent.mkdir()
    system.write_text("[jobs]\nmax_attempts = 7\n")
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    monkeypatch.delenv("WANBOX_ROOT", raising=False)
    root = tmp_path / "root"
    root.mkdir()
    # no root given: the system file
    cfg = load_config()
    assert cfg.source == system and cfg.jobs.max_attempts == 7 and cfg.found == "the system config"
    # a root without its own file: the defaults under it, never the system file (it may name another ledger)
    cfg = load_config(None, root)
    assert cfg.source is None and cfg.jobs.max_attempts == 3 and cfg.paths.root == root
    assert cfg.found == f"built-in defaults (no {root / 'config.toml'})"
    # the root's config.toml, found by --root and by WANBOX_ROOT; the root stays the one it was found in
    (root / "config.toml").write_text("[paths]\nroot = \"/elsewhere\"\n[pool]\ndevice = \"cpu\"\nmax_area = 4096\n")
    for cfg in (load_config(None, root), _with_env(monkeypatch, root)):
        assert cfg.source == root / "config.toml" and cfg.found == "the root's config.toml"
        assert cfg.pool.device == "cpu" and cfg.pool.max_area == 4096 and cfg.paths.root == root
    # --config wins over everything
    given = write(tmp_path, "[jobs]\nmax_attempts = 5\n")
    cfg = load_config(given, root)
    assert cfg.source == given and cfg.jobs.max_attempts == 5 and cfg.found == "given with --config"


def _with_env(monkeypatch: pytest.MonkeyPatch, root: Path):
    monkeypatch.setenv("WANBOX_ROOT", str(root))
    try:
        return load_config()
    finally:
        monkeypatch.delenv("WANBOX_ROOT")


def test_doctor_says_which_config_file_it_read(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "config.toml").write_text("[pool]\ndevice = \"cpu\"\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "doctor", "--root", str(tmp_path), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    import json

    checks = {c["name"]: c for c in json.loads(out.stdout)}
    detail = checks["config"]["detail"]
    assert detail.startswith(f"{tmp_path / 'config.toml'} (the root's config.toml); looked for: --config FILE")
