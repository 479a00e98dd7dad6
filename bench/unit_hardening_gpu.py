"""Check on a real GPU host that the unit's hardening leaves the GPUs working: run the CUDA worker tests (NCCL,
torch.compile/Triton) and the notification tests (sockets, threads, commands) as a transient systemd service
with every sandboxing directive of systemd/wanbox.service. Prints one JSON object.

Needs root and a running systemd (systemd-run); it starts nothing else and leaves nothing behind:

    sudo python bench/unit_hardening_gpu.py --user $USER          # from a checkout with its .venv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Service settings that are not sandboxing (how it starts, stops, logs): not applied to the test run.
NOT_SANDBOXING = {"Type", "NotifyAccess", "ExecStart", "EnvironmentFile", "User", "Group", "StateDirectory",
                  "StateDirectoryMode", "KillMode", "KillSignal", "TimeoutStopSec", "TimeoutStartSec",
                  "WatchdogSec", "Restart", "RestartSec", "StandardOutput", "StandardError", "SyslogIdentifier",
                  "LimitNOFILE", "LimitMEMLOCK", "ReadWritePaths",
                  "RemoveIPC"}  # fmt: skip - it would remove the IPC objects of the (human) user the check runs as


def sandboxing(unit: Path) -> list[str]:
    """The [Service] lines of the unit that restrict the process, as KEY=VALUE."""
    found, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#") \
                and line.split("=", 1)[0] not in NOT_SANDBOXING:
            found.append(line)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--user", required=True, help="the unprivileged user the tests run as (owns the checkout)")
    p.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--tests", nargs="*", default=["tests/test_worker_gpu.py", "tests/test_notifications.py"])
    args = p.parse_args(argv)
    directives = sandboxing(REPO / "systemd" / "wanbox.service")
    overrides = []
    if str(REPO).startswith(("/home/", "/root")):  # ProtectHome would hide the checkout itself
        overrides.append("ProtectHome=read-only")
    props = [*directives, *overrides, f"User={args.user}", f"WorkingDirectory={REPO}", f"ReadWritePaths={REPO}",
             "LimitMEMLOCK=infinity"]  # fmt: skip
    command = ["systemd-run", "--wait", "--pipe", "--collect", "--quiet", "--unit", "wanbox-hardening-check",
               *[f"--property={p}" for p in props], f"--setenv=PYTHONPATH={REPO}", "--setenv=HOME=/tmp",
               args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    print(json.dumps({"rc": result.returncode, "seconds": round(time.monotonic() - started, 1),
                      "directives": len(directives), "overrides": overrides, "tests": args.tests,
                      "tail": (result.stdout + result.stderr).splitlines()[-15:]}, indent=2))  # fmt: skip
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
