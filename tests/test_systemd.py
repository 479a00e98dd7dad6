"""systemd integration: sd_notify over a real AF_UNIX datagram socket, and the unit's required settings.

No systemd needed: the test plays systemd's side of NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import notify

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_sd_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert notify.sd_notify("READY=1\nSTATUS=warm")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=warm"


def test_no_notify_socket_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.sd_notify("READY=1") is False


def test_unreachable_socket_never_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.sd_notify("READY=1") is False


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wanbox-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert notify.sd_notify("WATCHDOG=1")
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notifier_ready_once_status_on_change_and_paced_watchdog(notify_socket: socket.socket,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2 -> ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = notify.Notifier()
    assert notifier.interval == pytest.approx(0.1)
    notifier.ready()
    notifier.ready()
    notifier.status("job A sampling 1/4")
    notifier.status("job A sampling 1/4")
    notifier.status("job A sampling 2/4\nwith a newline")
    notifier.healthy()
    notifier.healthy()  # too soon: no second ping
    notifier.stopping()
    notify_socket.settimeout(0.5)
    got = []
    while True:
        try:
            got.append(notify_socket.recv(4096).decode())
        except TimeoutError:
            break
    assert got == ["READY=1", "STATUS=job A sampling 1/4", "STATUS=job A sampling 2/4 with a newline",
                   "WATCHDOG=1", "STOPPING=1"]


def test_watchdog_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None


def test_the_daemon_says_ready_to_systemd(tmp_path: Path, notify_socket: socket.socket) -> None:
    """A real `wanbox serve` process sends READY=1, STATUS= and, on SIGTERM, STOPPING=1."""
    from tests.workers.harness import Root

    root = Root(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(root.config)],
                            cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        notify_socket.settimeout(30)
        messages = [notify_socket.recv(4096).decode()]
        assert messages == ["READY=1"]
        messages.append(notify_socket.recv(4096).decode())
        assert messages[1].startswith("STATUS=idle")
        proc.terminate()
        assert proc.wait(30) == 0
        rest = []
        notify_socket.settimeout(1)
        while True:
            try:
                rest.append(notify_socket.recv(4096).decode())
            except TimeoutError:
                break
        assert "STOPPING=1" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_with_preload_ready_waits_for_the_warm_pool(tmp_path: Path, notify_socket: socket.socket) -> None:
    from tests.workers.harness import Root

    root = Root(tmp_path, pool={"preload": "i2v-A14B"})
    root.knobs({"*": {"load_seconds": 1.0}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(root.config)],
                            cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        notify_socket.settimeout(30)
        messages = []
        while "READY=1" not in messages:
            messages.append(notify_socket.recv(4096).decode())
        assert messages[0] == "STATUS=loading i2v-A14B", messages
        assert [p for p in root.worker_pids()], "READY=1 came before the pool was launched"
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        root.cleanup()


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / "wanbox.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_has_the_required_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"]
    assert s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) > 0 and int(s["TimeoutStopSec"][0]) >= 60
    assert "StartLimitIntervalSec" in s and "StartLimitBurst" in s
    assert s["User"] == ["wanbox"] and s["StateDirectory"] == ["wanbox"]
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/wanbox"]
    assert s["NoNewPrivileges"] == ["true"] and s["PrivateTmp"] == ["true"]
    assert any("/dev/nvidiactl" in v for v in s["DeviceAllow"])
    assert s["ExecStart"][0].split()[1:3] == ["serve", "--config"]
    assert s["EnvironmentFile"][0].startswith("-")  # optional: a missing env file is not an error


def test_every_unit_setting_has_a_reason_comment() -> None:
    lines = (SYSTEMD / "wanbox.service").read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")) and not line.startswith(("Description", "Documentation", "DeviceAllow")):
            above = [entry for entry in lines[:index] if entry.strip()]
            assert above and (above[-1].startswith("#") or "=" in above[-1]), f"no reason above {line!r}"


def test_sysusers_and_tmpfiles_snippets_match_the_unit() -> None:
    sysusers = [line.split() for line in (SYSTEMD / "wanbox.sysusers.conf").read_text().splitlines()
                if line and not line.startswith("#")]
    assert sysusers[0][:2] == ["u", "wanbox"]
    tmpfiles = [line.split() for line in (SYSTEMD / "wanbox.tmpfiles.conf").read_text().splitlines()
                if line and not line.startswith("#")]
    paths = {entry[1] for entry in tmpfiles}
    for folder in ("inbox", "outbox", "failed", "work", "state"):
        assert f"/var/lib/wanbox/{folder}" in paths
    assert all(entry[0] == "d" and len(entry) == 6 for entry in tmpfiles)


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "wanbox.service"
    unit.write_text((SYSTEMD / "wanbox.service").read_text().replace("/usr/bin/wanbox", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wanbox.service" not in result.stderr, result.stderr  # no warnings about our unit either


MAX_EXPOSURE = 4.0  # the unit's `systemd-analyze security` score must stay at or below this (README: Operating)


def systemd_analyze() -> str:
    """The tool's path; skipped where it is missing, except under CI (.ci/run installs it and sets WANBOX_CI)."""
    import shutil

    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("WANBOX_CI"):
            pytest.fail("systemd-analyze is missing on the CI machine: .ci/run installs the distribution's systemd")
        pytest.skip("systemd-analyze not installed")
    return found


def test_the_units_security_exposure_is_at_most_4(tmp_path: Path) -> None:
    """Offline review of the unit file (no running systemd needed), with the hardening the GPUs allow."""
    import re

    unit = tmp_path / "wanbox.service"
    unit.write_text((SYSTEMD / "wanbox.service").read_text().replace("/usr/bin/wanbox", sys.executable))
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
                             str(unit)], capture_output=True, text=True, timeout=60)  # fmt: skip
    score = re.search(r"Overall exposure level for wanbox\.service: (\d+\.\d)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert float(score.group(1)) <= MAX_EXPOSURE and result.returncode == 0, result.stdout[-3000:]
    readme = (REPO / "README.md").read_text()
    assert f"`systemd-analyze security` exposure {score.group(1)}" in readme  # the recorded score is current


def test_hardening_keeps_gpus_sockets_and_data_paths() -> None:
    """What the daemon needs under the hardening: the NVIDIA devices, the address families of the pool socket,
    sd_notify, torchrun/NCCL, PostgreSQL and webhooks, the data root writable, and no JIT-breaking W^X."""
    s = unit_settings()
    families = s["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    assert s["CapabilityBoundingSet"] == [""] and s["PrivateDevices"] == ["false"] and s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"/dev/nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"} <= allowed
    assert "@system-service" in s["SystemCallFilter"] and "~@privileged" in s["SystemCallFilter"]
    assert not any("@resources" in v for v in s["SystemCallFilter"])  # NCCL's affinity, NUMA mbind
    assert "MemoryDenyWriteExecute" not in s and "ProcSubset" not in s  # torch.compile; /proc/driver/nvidia
    assert s["ProtectProc"] == ["invisible"] and s["UMask"] == ["0027"]
    assert "/var/lib/wanbox" in s["ReadWritePaths"]


def test_readme_installs_each_file_where_its_own_comment_says() -> None:
    """Package files (sysusers, tmpfiles) go to /usr/lib, the edited unit and config to /etc: one path each."""
    readme = (REPO / "README.md").read_text()
    for name in ("wanbox.sysusers.conf", "wanbox.tmpfiles.conf", "wanbox.service", "config.example.toml"):
        first = (SYSTEMD / name).read_text().splitlines()[0]
        target = next(word.rstrip(":,") for word in first.split() if word.startswith("/"))
        assert target.startswith(("/usr/lib/", "/etc/")), (name, target)
        folder = target if target.endswith("/") else target.rsplit("/", 1)[0] + "/"
        installs = [line for line in readme.splitlines() if f"systemd/{name}" in line]
        assert installs and any(target in line or folder in line for line in installs), (name, target)


def test_the_gpu_hardening_check_applies_every_sandboxing_line_of_the_unit() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import unit_hardening_gpu
    finally:
        sys.path.remove(str(REPO / "bench"))
    lines = unit_hardening_gpu.sandboxing(SYSTEMD / "wanbox.service")
    keys = {line.split("=", 1)[0] for line in lines}
    assert {"SystemCallFilter", "RestrictAddressFamilies", "CapabilityBoundingSet", "DeviceAllow", "ProtectProc",
            "DevicePolicy", "UMask", "PrivateTmp"} <= keys  # fmt: skip
    assert not keys & {"ExecStart", "User", "Type", "Restart", "RemoveIPC"}
    assert lines.count("SystemCallFilter=~@privileged") == 1
