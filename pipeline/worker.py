"""The warm pool: a torchrun entry point that loads a model family once and runs the supervisor's jobs on it.

Rank 0 alone talks to the supervisor (JSON lines on a Unix socket) and fans commands out over a gloo group;
it must not touch the ledger, the inbox or the outbox: it only writes the output file it is told to.

    torchrun --standalone --nproc-per-node N -m pipeline.worker --model i2v-A14B --socket S --checkpoint-dir D
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from daemon import protocol
from daemon.diskspace import full_disk_error, no_space_text
from daemon.states import ErrorKind
from inbox_schema import model_ids
from pipeline.families.base import (
    JobCancelled,
    JobInputError,
    PoolShutdown,
    fingerprint,
    open_family,
    precision_of,
)
from pipeline.families.resume import checkpoint_store
from pipeline.models import attention as attention_mod
from pipeline.models.fp8 import PRECISIONS
from pipeline.rank_failures import FailureWatch
from pipeline.video import DEFAULT_CRF, VideoOutput

IDLE_FOREVER = timedelta(days=365)  # the control group waits for the next job however long the queue is idle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.worker", description=__doc__)
    p.add_argument("--model", required=True, choices=model_ids())
    p.add_argument("--socket", required=True, help="the supervisor's Unix socket (rank 0 connects)")
    p.add_argument("--checkpoint-dir", required=True, help="the model's checkpoint directory")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for tests and the demo")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--cfg-parallel", action="store_true", help="cond/uncond branches on two halves of the ranks")
    p.add_argument("--sharding", default="auto", choices=("auto", "replicate", "fsdp", "offload"),
                   help="DiT weights: a copy per GPU, FSDP shards, or (one GPU) the idle expert in host memory")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="H.264 quality (reference: 10)")
    p.add_argument("--max-area", type=int, default=None, help="cap every job's pixel area (tiny models, demo)")
    p.add_argument("--collective-timeout", type=float, default=600.0,
                   help="seconds a compute collective may wait before the pool is declared dead")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--failure-grace", type=float, default=30.0,
                   help="seconds a rank's posted failure may wait for the closing gather before rank 0 reports "
                        "it and ends the pool (the other ranks are then stuck in a collective)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="the DiT blocks' Linear layers: bf16 (in --dtype) or fp8 (e4m3, per-row scales; NVIDIA "
                        "GPUs of compute capability 8.9+, pipeline.models.fp8)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="with --precision fp8, also let the attention picker use an 8-bit kernel (FlashAttention-3's "
                        "FP8 forward): faster, but lossy (bench/RESULTS.md); off by default")
    p.add_argument("--lora-method", default="auto", choices=("auto", "merged", "unmerged"),
                   help="how a job's LoRAs go on the experts: by the cost rule (pipeline.lora.choose_method), or "
                        "always merged (exact restore) or unmerged (hooks)")
    p.add_argument("--lora-cache-mb", type=int, default=4096,
                   help="LoRA files kept read per rank between jobs (by sha256)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="regional torch.compile of the DiT blocks (auto: on for cuda); the first job of each "
                        "resolution pays ~20 s of compilation, every later step runs ~15%% faster")
    return p.parse_args(argv)


# --- 1. set up: ranks, devices, process groups ---------------------------------------------------


@dataclass
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup  # gloo, CPU tensors, long timeout: commands and bookkeeping, never compute

    @property
    def master(self) -> bool:
        return self.rank == 0


def set_up(args: argparse.Namespace) -> Ranks:
    """Join the process group torchrun prepared (or a group of one when started directly)."""
    if "RANK" not in os.environ:  # started without torchrun: a pool of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = timedelta(seconds=args.collective_timeout)
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=IDLE_FOREVER)
    return Ranks(rank, world_size, local_rank, device, control)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_devices(ranks: Ranks) -> list[dict[str, Any]]:
    """Every rank's device name and memory, gathered on all ranks (for `hello`)."""
    if ranks.device.type == "cuda":
        props = torch.cuda.get_device_properties(ranks.device)
        mine = {"name": props.name, "memory_total": props.total_memory}
    else:
        mine = {"name": "cpu", "memory_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    mine.update(rank=ranks.rank, pid=os.getpid())
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, mine, group=ranks.control)
    return every


# --- 2. the supervisor link (rank 0) and the fan-out to the other ranks ----------------------------


class Link:
    """Rank 0's socket to the supervisor plus the broadcast of its commands; on other ranks only the latter."""

    def __init__(self, ranks: Ranks, channel: protocol.Channel | None) -> None:
        self.ranks = ranks
        self.channel = channel
        self.waiting: list[protocol.Message] = []  # commands read while a job ran, handled after it

    def say(self, msg: protocol.Message) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(msg)
        except OSError as exc:  # the supervisor is gone: the next read sees EOF and the pool shuts down
            print(f"worker: could not send {msg.type} to the supervisor: {exc}", file=sys.stderr)

    def next_command(self) -> protocol.Message:
        """The next command, identical on every rank; a closed socket reads as shutdown."""
        command = None
        if self.ranks.master:
            command = self.waiting.pop(0) if self.waiting else self._read()
        return self._share(command)

    def cancel_requested(self, job: str) -> bool:
        """At a step boundary: did a cancel (or shutdown) for `job` arrive? Same answer on every rank."""
        verdict = None
        if self.ranks.master:
            verdict = self._poll(job)
        verdict = self._share(verdict)
        if verdict == "shutdown":
            raise PoolShutdown("the pool is shutting down")
        return verdict == "cancel"

    def _read(self) -> protocol.Message:
        assert self.channel is not None
        while True:
            try:
                msg = self.channel.recv()
            except protocol.ProtocolError as exc:
                print(f"worker: ignoring a garbled line from the supervisor: {exc}", file=sys.stderr)
                continue
            except OSError:
                msg = None
            return protocol.to_message(msg) if msg is not None else protocol.Shutdown()  # closed: shut down

    def _poll(self, job: str) -> str | None:
        assert self.channel is not None
        while True:
            try:
                msg = self.channel.recv(timeout=0.001)
            except TimeoutError:
                return None
            except protocol.ProtocolError as exc:
                print(f"worker: ignoring a garbled line from the supervisor: {exc}", file=sys.stderr)
                continue
            except OSError:
                msg = None
            command = protocol.to_message(msg) if msg is not None else protocol.Shutdown()
            if isinstance(command, protocol.Shutdown):
                self.waiting.insert(0, command)
                return "shutdown"
            if isinstance(command, protocol.Cancel) and command.job == job:
                return "cancel"
            if isinstance(command, protocol.Run):
                self.waiting.append(command)  # the supervisor sent the next job early: keep it
            # a cancel for a job that is not running is already satisfied: nothing to do

    def _share(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.ranks.control)
        return box[0]


def connect_supervisor(args: argparse.Namespace, ranks: Ranks) -> Link:
    channel = protocol.connect(args.socket, timeout=args.connect_timeout) if ranks.master else None
    return Link(ranks, channel)


# --- 3. one job --------------------------------------------------------------------------------


@dataclass
class JobReport:
    """What rank 0 tells the supervisor about a job: phases timed as progress reports come in."""

    job: str
    link: Link
    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    _phase: str | None = None
    _phase_start: float = 0.0

    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self._close_phase(now)
            self._phase, self._phase_start = phase, now
        self.link.say(protocol.Progress(job=self.job, phase=phase, step=int(step), total=int(total)))

    def finish(self) -> None:
        self._close_phase(time.monotonic())
        self._phase = None

    def _close_phase(self, now: float) -> None:
        if self._phase is not None:
            self.phases[self._phase] = round(self.phases.get(self._phase, 0.0) + now - self._phase_start, 3)


def run_job(family: Any, run: protocol.Run, ranks: Ranks, link: Link, args: argparse.Namespace,
            first_job: bool, load_seconds: float, watch: FailureWatch, seq: int) -> protocol.Done | protocol.Error:
    """Run one job (the pool's job number `seq`) on every rank; rank 0's reply (done or error)."""
    report = JobReport(run.job, link)
    reset_peak_memory(ranks.device)
    with watch.watching(seq):  # rank 0: a rank's failure reported even if another rank never gets here
        failure, result = attempt(family, run, ranks, report, link, args)
        report.finish()
        if failure is not None:
            watch.post(seq, failure)
        # Every rank reports its outcome so that a failure on any rank reaches the supervisor.
        outcomes = gather_on_control(ranks, (failure, peak_memory(ranks.device)))
    failures = [f for f, _ in outcomes if f is not None]
    if failures:
        return failures[0]
    return done_message(run, result, report, outcomes, ranks, family, first_job, load_seconds)


def attempt(family: Any, run: protocol.Run, ranks: Ranks, report: JobReport, link: Link,
            args: argparse.Namespace) -> tuple[protocol.Error | None, dict[str, Any]]:
    """Run the job on this rank: (None, result) or (the error message, {})."""
    failure: protocol.Error | None = None
    result: dict[str, Any] = {}
    video = VideoOutput(run.output, run.crf if run.crf is not None else args.crf) if ranks.master else None
    try:
        if run.params.kind != family.kind:
            raise JobInputError(f"kind: got {run.params.kind!r}, but this pool runs {args.model} "
                                f"({family.kind} jobs); the supervisor must relaunch the pool for it")
        store = checkpoint_store(run, family)  # resume: None unless the run asks for sampling checkpoints
        streamed = {"video_out": video} if video is not None and getattr(family, "streams_video", False) else {}
        result = family.run(run.params, run.inputs, report=report,
                            should_cancel=lambda: link.cancel_requested(run.job), checkpoint=store, **streamed)
        if video is not None:
            report.progress("write", 0, 1)  # a streamed video only flushes here: its frames were encoded already
            video.finish(result.get("video"), result["fps"])
            report.progress("write", 1, 1)
    except PoolShutdown:
        failure = error_message(run.job, ErrorKind.CANCELLED, "the pool shut down during the job; it will run again",
                                True)
    except JobCancelled:
        failure = error_message(run.job, ErrorKind.CANCELLED, "cancelled at a step boundary", False)
    except Exception as exc:
        failure = classify_failure(run.job, exc)
    finally:
        if video is not None:
            video.abort()  # after a failure or cancel no partial mp4 stays; after finish() there is none left
    return failure, result


def done_message(run: protocol.Run, result: dict[str, Any], report: JobReport, outcomes: list[Any],
                 ranks: Ranks, family: Any, first_job: bool, load_seconds: float) -> protocol.Done:
    stats = {
        "phases": report.phases,
        "gpu_seconds": round((time.monotonic() - report.started) * ranks.world_size, 3),
        "peak_memory": [memory for _, memory in outcomes],
        "model_load": first_job,
        "attention": attention_mod.active_backend(),  # the kernel that ran (after its self-test): fa3, cudnn, ...
        "frames": result["frames"], "width": result["width"], "height": result["height"],
        "fps": result["fps"], "seed": result["seed"],
        "precision": precision_of(family.args),  # fp8, fp8+fp8-attention, bf16 or fp32
        "loras": result.get("loras", []),  # per LoRA: file, sha256, strength, format, experts, method (families)
        **result.get("stats", {}),  # the family's own: resumed_from, checkpoint
    }
    for extra in ("lora_switch_seconds", "relighting"):  # what some jobs' families report besides
        if extra in result:
            stats[extra] = result[extra]
    if first_job:
        stats["load_seconds"] = round(load_seconds, 3)
    if ranks.master:
        stats["checkpoints"] = family.checkpoints
    return protocol.Done(job=run.job, output=run.output, stats=stats)


def error_message(job: str | None, kind: ErrorKind, message: str, retryable: bool) -> protocol.Error:
    return protocol.Error(job=job, kind=kind, message=message, retryable=retryable)


def classify_failure(job: str, exc: BaseException) -> protocol.Error:
    """An exception as an `error` message a person can act on (OOM says what to change)."""
    traceback.print_exception(exc, file=sys.stderr)
    known = getattr(exc, "kind", None)  # families' JobFailure, sampling's NonFiniteError: they know what they are
    if known in {k.value for k in ErrorKind} and hasattr(exc, "retryable"):
        return error_message(job, ErrorKind(known), first_line(exc), bool(exc.retryable))
    full = full_disk_error(exc)
    if full is not None:  # the host's problem, whichever library raised it: the job waits for space
        return error_message(job, ErrorKind.DISK, no_space_text(full, None, "writing the job's files"), True)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return error_message(job, ErrorKind.OOM, f"out of memory: {first_line(exc)}; use fewer frames or a smaller "
                             "size, or give the pool more GPUs (pool.nproc) or shard the weights (worker "
                             "flag --sharding fsdp in pool.command)", False)
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError, TypeError)):
        return error_message(job, ErrorKind.INPUT, f"{type(exc).__name__}: {first_line(exc)}", False)
    return error_message(job, ErrorKind.INTERNAL, f"{type(exc).__name__}: {first_line(exc)}", True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:2000]


def gather_on_control(ranks: Ranks, value: Any) -> list[Any]:
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, value, group=ranks.control)
    return every


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes of this job on a GPU; on a CPU the process's peak resident size (for the whole run)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def free_memory(device: torch.device) -> None:
    """Drop the finished job's tensors before the next one (the pool stays up for weeks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runtime(args: argparse.Namespace) -> dict[str, Any]:
    """What made the videos beyond the weights, for the sidecar (the supervisor never imports torch)."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "max_area": args.max_area}


# --- 4. the pool: set up, load, loop over jobs, report ------------------------------------------


LOAD_SEQ = -1  # the failure watch's number for the model load (jobs count from 0)


def load(args: argparse.Namespace, ranks: Ranks, link: Link, devices: list[dict[str, Any]],
         watch: FailureWatch) -> Any | None:  # fmt: skip
    """Plan, say hello, load the family on every rank; None (after telling the supervisor why) on failure."""
    family, failure = None, None
    try:
        family = open_family(args, ranks)
        link.say(protocol.Hello(model=args.model, world_size=ranks.world_size, pid=os.getpid(), devices=devices,
                                parallel=family.parallel, runtime=runtime(args)))
        family.load()
        family.checkpoints = fingerprint(Path(args.checkpoint_dir)) if ranks.master else {}
    except Exception as exc:
        traceback.print_exception(exc, file=sys.stderr)
        why = f"{type(exc).__name__}: {first_line(exc)}"
        failure = f"rank {ranks.rank}: {why}"
        # posted for rank 0's watch: the other ranks may be inside a collective (FSDP sharding) for good
        watch.post(LOAD_SEQ, error_message(None, ErrorKind.INTERNAL, f"could not load {args.model}: {why}", False))
    failures = [f for f in gather_on_control(ranks, failure) if f is not None]
    if failures:  # any rank's failure, named, so the supervisor's error says what to fix
        link.say(error_message(None, ErrorKind.INTERNAL, f"could not load {args.model}: {failures[0]}", False))
        return None
    return family



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = set_up(args)
    link = connect_supervisor(args, ranks)
    devices = describe_devices(ranks)

    watch = FailureWatch(ranks.rank, ranks.world_size, args.failure_grace, report=link.say)
    started = time.monotonic()
    with watch.watching(LOAD_SEQ):
        family = load(args, ranks, link, devices, watch)
    if family is None:
        return 1
    load_seconds = time.monotonic() - started
    link.say(protocol.Ready(load_seconds=round(load_seconds, 3)))

    jobs_run = 0
    while True:
        command = link.next_command()
        if isinstance(command, protocol.Shutdown):
            break
        if not isinstance(command, protocol.Run):
            continue  # a cancel for a job that already ended
        reply = run_job(family, command, ranks, link, args, first_job=jobs_run == 0, load_seconds=load_seconds,
                        watch=watch, seq=jobs_run)
        link.say(reply)
        jobs_run += 1
        free_memory(ranks.device)

    dist.barrier(group=ranks.control)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
