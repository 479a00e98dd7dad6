"""The `wanbox` command line: serve, submit, status, show, cancel, retry, validate, doctor, models, ...

Read commands and cancel/retry talk to the ledger only (the running supervisor notices changes);
it must not import torch, and must never move or delete files of jobs the supervisor owns.

Exit codes: 0 ok, 1 failure, 2 usage error or invalid input, 3 job/file not found, 4 bad config,
5 not available in this build.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config
from daemon.jobtext import (
    attempt_hosts,
    eta_text,
    job_summary,
    manifest_location,
    namesakes_note,
    progress_bar,
    render_status,
    waiting_text,
)
from inbox_schema import model_ids
from pipeline.weights.lora_packs import PACKS as LORA_PACKS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFIG, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EPILOG = ("exit codes: 0 ok, 1 failure, 2 usage error or invalid input, 3 job or file not found, "
          "4 bad configuration, 5 not available in this build")


# --- helpers --------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.root)


def _open_ledger(cfg: Config, create: bool = False) -> Any:
    from daemon.ledger import Ledger

    if not create and "://" not in str(cfg.paths.ledger) and not Path(cfg.paths.ledger).exists():
        raise FileNotFoundError(
            f"no ledger at {cfg.paths.ledger}: has `wanbox serve` run with this root ({cfg.paths.root})? "
            "Use --root DIR or --config FILE"
        )
    return Ledger.open(cfg.paths.ledger)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))




# --- commands -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.supervisor import serve

    return serve(_config(args))


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.estimates import job_etas
    from daemon.liveness import read_liveness

    cfg = _config(args)
    with _open_ledger(cfg) as ledger:
        while True:
            jobs = ledger.list(limit=args.limit)
            counts = {s.value: n for s, n in ledger.counts_by_state().items()}
            alive = read_liveness(ledger.engine, cfg.paths.root, cfg.paths.state)  # the daemon's and pool's heartbeat
            etas = job_etas(ledger)
            if args.json:
                _print_json({"counts": counts, **alive.to_json(), "jobs": [
                    {**job_summary(j, etas.get(j.id)), "stale": alive.stale(j)} for j in jobs]})  # fmt: skip
                return EXIT_OK
            text = alive.render() + "\n\n" + render_status(jobs, counts, alive.stale, etas)
            if not args.watch:
                print(text)
                return EXIT_OK
            sys.stdout.write("\x1b[2J\x1b[H" + text + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)




def cmd_show(args: argparse.Namespace) -> int:
    from daemon.estimates import job_etas
    from daemon.liveness import job_daemon_events

    cfg = _config(args)
    from daemon.notifications import notification_lines

    with _open_ledger(cfg) as ledger:
        job = ledger.get(args.job)
        eta = job_etas(ledger).get(job.id)
        note = namesakes_note(ledger, job, args.job)
        events = ledger.events(job.id)
        daemon_events = job_daemon_events(ledger.engine, cfg.paths.root, cfg.paths.state, job, events)
        notifications = notification_lines(ledger, job.id)
    if args.json:
        _print_json({**job_summary(job, eta), "parameters": job.params_json, "timings": job.timings_json,
                     "gpu_seconds": job.gpu_seconds, "work_dir": job.work_dir, "manifest": job.manifest_path,
                     "holder": job.holder, "lease_until": job.lease_until,
                     "events": [{"at": e.at, "from": e.from_state, "to": e.to_state, "message": e.message,
                                 "host": e.host} for e in events],
                     "daemon_events": [{"at": at, "message": text} for at, text in daemon_events],
                     "notifications": notifications})  # fmt: skip
        return EXIT_OK
    print(f"job {job.id}  {job.name}  ({job.kind}, {job.model_id or '?'})  state: {job.state.value}")
    if note:
        print(note)
    print(f"  manifest: {manifest_location(job, cfg)}")
    print(f"  attempts: {job.attempts_made} of {job.max_attempts}   priority: {job.priority}")
    if attempt_hosts(events):
        print(f"  runs:     {attempt_hosts(events)} (the host of each attempt on a pool)")
    if waiting_text(job):
        print(f"  {waiting_text(job)}")
    if job.phase:
        print(f"  progress: {job.phase} {progress_bar(job.step, job.total_steps)} {eta_text(eta)}")
    if job.last_error:
        print(f"  last error ({job.error_kind}): {job.last_error}")
    for key, value in (job.outputs_json or {}).items():
        print(f"  {key}: {value}")
    if job.timings_json:
        print("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings_json.items()))
    if job.params_json:
        spec = job.job
        print(f"  parameters: size {spec.video.size}, frames {spec.video.frames}, fps {spec.video.fps}, "
              f"steps {spec.sampling.steps}, seed {spec.seed}")
    print("  events:")
    lines = [(e.at, f"{e.from_state.value if e.from_state else '-':>13} -> {e.to_state.value:<13} {e.message}"
                    + (f"  [{e.host}]" if e.host else "")) for e in events] + [(at, f"{'(daemon)':>13}    {text}") for at, text in daemon_events]
    for at, text in sorted(lines, key=lambda line: line[0]):
        print(f"    {at:%Y-%m-%d %H:%M:%S}  {text}")
    if notifications:
        print("  notifications:")
        for line in notifications:
            print(f"    {line}")
    return EXIT_OK




def cmd_drain(args: argparse.Namespace) -> int:
    from daemon.drain import request_drain
    from daemon.heartbeat import default_host_id

    cfg = _config(args)
    with _open_ledger(cfg) as ledger:
        done, text = request_drain(ledger.engine, args.host or default_host_id(cfg.paths.root), args.undo)
    print(text, file=sys.stdout if done else sys.stderr)
    return EXIT_OK if done else EXIT_NOT_FOUND


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with _open_ledger(cfg) as ledger:
        job = ledger.get(args.job)
        note = namesakes_note(ledger, job, args.job)
        was = ledger.cancel(job.id, "cancelled by user (wanbox cancel)")
    print(f"cancelled {job.id} ({job.name}), which was {was.value}"
          + ("; the running pool stops it at the next step" if was.value == "sampling" else ""))
    if note:
        print(note)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with _open_ledger(cfg) as ledger:
        picked = ledger.get(args.job)
        note = namesakes_note(ledger, picked, args.job)
        job = ledger.retry(picked.id, "retried by user (wanbox retry)")
    print(f"{job.id} ({job.name}) is queued again")
    if note:
        print(note)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from daemon.prune import prune_done

    cfg = _config(args)
    with _open_ledger(cfg) as ledger:
        gone = prune_done(ledger, cfg.paths.work, timedelta(days=args.older_than), dry_run=args.dry_run)
    if args.json:
        _print_json([{"job": p.job_id, "name": p.name, "folder": str(p.folder), "bytes": p.bytes} for p in gone])
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for p in gone:
        print(f"{verb} {p.folder} ({p.name}, {p.bytes / 2**20:.1f} MiB)")
    total = sum(p.bytes for p in gone) / 2**30
    print(f"{verb} the work folders of {len(gone)} job(s) delivered over {args.older_than:g} days ago: {total:.2f} GiB")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from inbox_schema.cli import main as validate_main

    return validate_main(args.rest)


def cmd_submit(args: argparse.Namespace) -> int:
    from daemon.submit import submit

    cfg = _config(args)
    for line in submit(Path(args.file), cfg.paths.inbox, name=args.name):
        print(line)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from daemon.doctor import run_checks

    cfg = _config(args)
    results = run_checks(cfg)
    if args.json:
        _print_json([r.__dict__ for r in results])
    else:
        for r in results:
            print(f"[{r.status.upper():4}] {r.name}: {r.detail}")
    return EXIT_FAILURE if any(r.status == "fail" for r in results) else EXIT_OK


def cmd_ledger(args: argparse.Namespace) -> int:
    from daemon import ledger_admin

    cfg = _config(args)
    if args.action == "migrate":
        before, after = ledger_admin.migrate(cfg.paths.ledger)
        where = ledger_admin.shown(cfg.paths.ledger)
        print(f"ledger {where}: " + (f"already at {after}, nothing to do" if before == after else
                                     f"migrated from {before or 'an empty database'} to {after}"))
        return EXIT_OK
    info = ledger_admin.inspect_ledger(cfg.paths.ledger)
    if args.json:
        _print_json({**info.__dict__, "up_to_date": info.up_to_date})
    else:
        print("\n".join(ledger_admin.describe(info)))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    try:
        from pipeline.weights import hub
    except ImportError:
        return _unavailable("models")
    cfg = _config(args)
    if args.action == "list":
        return int(hub.main_list(cfg.pool.models_dir))
    if args.lora is not None:  # a published LoRA set, into the LoRA library
        library = cfg.pool.lora_library if args.dest is None else Path(args.dest)
        if args.action == "pull":
            return int(hub.main_pull_loras(args.lora, library))
        return int(hub.main_verify_loras(args.lora, library, deep=args.deep))
    dest = cfg.pool.checkpoint_dir(args.family) if args.dest is None else Path(args.dest)
    if args.action == "pull":
        code = int(hub.main_pull(args.family, dest))
        if code == EXIT_OK and args.family == "animate-14B":
            code = _pull_mediapipe(cfg.preprocess.mediapipe_dir)
        return code
    return int(hub.main_verify(args.family, dest, deep=args.deep))


def _pull_mediapipe(dest: Path) -> int:
    """Animate preprocessing needs Google's mediapipe task files too: fetch them (official locations, sha256)."""
    from pipeline.preprocess.animate.errors import PreprocessError
    from pipeline.preprocess.animate.models import fetch_models

    try:
        for path in fetch_models(dest):
            print(f"mediapipe model: {path}")
    except (OSError, PreprocessError) as exc:
        print(f"wanbox models pull: mediapipe task files into {dest}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_preprocess(args: argparse.Namespace) -> int:
    if getattr(args, "models_dir", None) is None and (args.root is not None or args.config is not None
                                                      or os.environ.get("WANBOX_MODELS_DIR") is None):
        args.models_dir = _config(args).preprocess.mediapipe_dir  # the daemon's configured mediapipe files
    return int(args.preprocess_run(args))


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from daemon import demo
    except ImportError:
        print("wanbox demo: not available in this build (daemon/demo.py is missing)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return int(demo.main(args.rest))


# --- the parser -----------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=argparse.SUPPRESS,
                        help="data root holding inbox/, outbox/, failed/, work/, state/")
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="config file (default: <root>/config.toml with --root or WANBOX_ROOT, else "
                             "/etc/wanbox/config.toml, else the built-in defaults)")


def _preprocess_parser(sub: Any, full: bool) -> None:
    p = sub.add_parser("preprocess", help="animate preprocessing of one video by hand (pose, face, mask)")
    if not full:  # another command runs: skip importing OpenCV and the animate code (~0.4 s per call)
        return
    try:
        from pipeline.preprocess.animate import cli as animate_cli
    except ImportError:
        animate_cli = None
    _common(p)
    if animate_cli is None:
        p.set_defaults(func=lambda _a: _unavailable("preprocess"))
        return
    animate_cli.add_arguments(p)
    p.set_defaults(func=cmd_preprocess, preprocess_run=animate_cli.run)


def _unavailable(what: str) -> int:
    print(f"wanbox {what}: not available in this build", file=sys.stderr)
    return EXIT_UNAVAILABLE


def build_parser(command: str | None = "preprocess") -> argparse.ArgumentParser:
    """The whole CLI; `command` (the one about to run) lets the others skip their heavy imports."""
    parser = argparse.ArgumentParser(prog="wanbox", description="Drop a job into a folder, get a video out.",
                                     epilog=EPILOG)
    _common(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon (under systemd: wanbox.service)")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="copy a manifest and its media into the inbox safely (media first)")
    _common(p)
    p.add_argument("file", help="the manifest (name.toml, or a folder with job.toml)")
    p.add_argument("--name", help="name in the inbox (default: the manifest's or folder's name)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="jobs and their progress")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="refresh with live progress until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=30)
    p.set_defaults(func=cmd_status)

    for name, func, text in (("show", cmd_show, "a job's timeline, parameters, errors and outputs"),
                             ("cancel", cmd_cancel, "cancel a job (a running one stops at its next step)"),
                             ("retry", cmd_retry, "run a failed or cancelled job again")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("job", help="job id, a unique prefix of it, or a job's name (its most recent job)")
        if name == "show":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("drain", help="a host takes no new jobs: it finishes its current one, then idles")
    _common(p)
    p.add_argument("--host", help="the host id (default: this host's: WANBOX_HOST_ID, else <hostname>-<root hash>)")
    p.add_argument("--undo", action="store_true", help="take new jobs again")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("prune", help="delete the work folders (inputs, intermediates) of long-delivered jobs")
    _common(p)
    p.add_argument("--older-than", type=float, default=14.0, metavar="DAYS",
                   help="jobs delivered more than this many days ago (default 14)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("validate", help="check a manifest (prints the resolved job or the errors)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("doctor", help="check paths, permissions, disk, GPUs, models, memory")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("ledger", help="the job database: migrate its schema (Alembic), or show its status")
    _common(p)
    p.add_argument("action", choices=("migrate", "status"))
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("models", help="download, verify or list model checkpoints")
    _common(p)
    p.add_argument("action", choices=("pull", "verify", "list"))
    p.add_argument("family", nargs="?", choices=list(model_ids()), help="model family (pull, verify)")
    p.add_argument("--lora", choices=list(LORA_PACKS), default=None,
                   help="instead of a family: a published LoRA set, into the LoRA library <models>/loras (pull, "
                        "verify)")
    p.add_argument("--dest", help="directory (default: the configured checkpoint dir; with --lora the LoRA "
                                  "library)")
    p.add_argument("--deep", action="store_true", help="verify: also check every file's sha256 (slow)")
    p.set_defaults(func=cmd_models)

    _preprocess_parser(sub, full=command == "preprocess")

    p = sub.add_parser("demo", help="a first run: tiny model, throwaway root, one job from a real photo",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    from daemon.journal import JOURNAL_SOCKET, JournalHandler, stderr_is_journal

    if stderr_is_journal() and Path(JOURNAL_SOCKET).exists():  # under systemd: structured fields, no duplicates
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))  # the journal adds time and level
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


# Commands whose options belong to another module's parser: everything after the name is passed through
# untouched (argparse's REMAINDER would still claim a leading "--option" for the subcommand).
DELEGATED = {"validate": cmd_validate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return int(DELEGATED[argv[0]](argparse.Namespace(rest=argv[1:])))
    parser = build_parser("preprocess" if "preprocess" in argv else None)
    args = parser.parse_args(argv)
    args.root = getattr(args, "root", None)
    args.config = getattr(args, "config", None)
    if args.command == "models" and args.action != "list" and args.family is None and args.lora is None:
        parser.error(f"wanbox models {args.action}: which family? expected one of {', '.join(model_ids())}")
    _setup_logging(args.verbose)
    from daemon.ledger import AmbiguousJobId, IllegalTransition, JobNotFound, LedgerError
    from daemon.submit import SubmitError
    from inbox_schema import ManifestInvalid

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"wanbox: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (JobNotFound, AmbiguousJobId, FileNotFoundError) as exc:
        print(f"wanbox: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except IllegalTransition as exc:
        print(f"wanbox: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except LedgerError as exc:  # unreachable database, a schema from a newer wanbox, ...
        print(f"wanbox {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "status" else EXIT_FAILURE
    except (SubmitError, ManifestInvalid) as exc:
        print(f"wanbox {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"wanbox {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
