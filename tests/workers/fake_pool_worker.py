"""A protocol-speaking stand-in for the GPU worker: launched by the pool manager like the real one.

It replaces only the model: it speaks the real protocol over the real socket and writes a REAL mp4
(PyAV, H.264, yuv420p). It must not be used outside tests. Knobs (environment, or a JSON file named
by FAKE_WORKER_KNOBS with {"<job name>" or "*": {...}}, read for every job):
  step_seconds, load_seconds, hang_at_step, exit_at_step, error ("oom"|"input"|"internal"),
  error_retryable, hang_on_load, bad_output (write a file that is not a video), extra_frames (write that many
  frames more than the job asks for, and say so in the stats).
Under torchrun with WORLD_SIZE > 1 the ranks join a gloo group and rank 0 fans each job out to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from daemon import protocol  # noqa: E402

ENV_KNOBS = {
    "step_seconds": ("FAKE_WORKER_STEP_SECONDS", float),
    "load_seconds": ("FAKE_WORKER_LOAD_SECONDS", float),
    "hang_at_step": ("FAKE_WORKER_HANG_AT_STEP", int),
    "exit_at_step": ("FAKE_WORKER_EXIT_AT_STEP", int),
    "error": ("FAKE_WORKER_ERROR", str),
    "hang_on_load": ("FAKE_WORKER_HANG_ON_LOAD", int),
}


def knobs_for(name: str | None) -> dict[str, Any]:
    found: dict[str, Any] = {"step_seconds": 0.02, "load_seconds": 0.0}
    for key, (env, cast) in ENV_KNOBS.items():
        if os.environ.get(env):
            found[key] = cast(os.environ[env])
    path = os.environ.get("FAKE_WORKER_KNOBS")
    if path and os.path.exists(path):
        table = json.loads(Path(path).read_text())
        found.update(table.get("*", {}))
        if name is not None:
            found.update(table.get(name, {}))
    return found


def video_shape(run: protocol.Run) -> tuple[int, int, int, int]:
    """(frames, width, height, fps) for the fake video: the job's frames and fps, a tiny even size."""
    video = run.params.video
    frames = int(video.frames or 9)
    fps = int(video.fps or 16)
    width, height = 64, 48
    image = run.inputs.get("image")
    if image and os.path.exists(image):
        from PIL import Image

        with Image.open(image) as im:
            scale = 64 / max(im.size)
            width, height = (max(16, int(v * scale) // 2 * 2) for v in im.size)
    return frames, width, height, fps


def write_mp4(path: Path, frames: int, width: int, height: int, fps: int) -> None:
    import av
    import numpy as np

    temp = path.with_name(f".{path.name}.partial")
    with av.open(str(temp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            rgb[..., 0] = (i * 255) // max(1, frames - 1)  # a ramp in red, so frames differ
            rgb[: height // 2, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(temp, path)


class Control:
    """Rank 0 talks to the supervisor; with WORLD_SIZE > 1 it shares each message with the other ranks."""

    def __init__(self, socket_path: str) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.chan = protocol.connect(socket_path, timeout=30) if self.rank == 0 else None
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo")
            self.dist = dist

    def share(self, msg: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.world == 1:
            return msg
        box = [msg]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def send(self, msg: protocol.Message) -> None:
        if self.chan is not None:
            self.chan.send(msg)

    def next_message(self) -> dict[str, Any] | None:
        msg = self.chan.recv() if self.chan is not None else None
        return self.share(msg)

    def cancelled(self, job: str) -> bool:
        flag = None
        if self.chan is not None:
            msg = self.chan.poll()
            flag = msg is not None and msg["type"] in ("cancel", "shutdown")
            if msg is not None and msg["type"] == "shutdown":
                self.shutdown_requested = True
        return bool(self.share({"flag": flag}) ["flag"]) if self.world > 1 else bool(flag)

    shutdown_requested = False


def run_job(ctl: Control, run: protocol.Run) -> None:
    job = run.job
    knobs = knobs_for(run.params.name)
    steps = run.params.sampling.steps
    started = time.monotonic()
    ctl.send(protocol.Progress(job=job, phase="encode", step=0, total=steps))
    for step in range(1, steps + 1):
        if ctl.cancelled(job):
            ctl.send(protocol.Error(job=job, kind="cancelled", message=f"cancelled at step {step}", retryable=False))
            return
        if knobs.get("exit_at_step") == step:
            os._exit(17)  # a crash: no goodbye, the connection just drops
        if knobs.get("hang_at_step") == step:
            while True:
                time.sleep(3600)
        if knobs.get("error") and step == 1:
            kind = knobs["error"]
            ctl.send(protocol.Error(job=job, kind=kind, message=f"injected {kind} error",
                                    retryable=bool(knobs.get("error_retryable", kind != "input"))))
            return
        time.sleep(float(knobs["step_seconds"]))
        ctl.send(protocol.Progress(job=job, phase="sampling", step=step, total=steps))
    ctl.send(protocol.Progress(job=job, phase="write", step=steps, total=steps))
    frames, width, height, fps = video_shape(run)
    frames += int(knobs.get("extra_frames", 0))
    output = Path(run.output)
    if ctl.rank == 0:
        if knobs.get("bad_output"):
            output.write_bytes(b"this is not a video")
        else:
            write_mp4(output, frames, width, height, fps)
    elapsed = time.monotonic() - started
    stats = {"phases": {"encode": 0.0, "sampling": elapsed, "decode": 0.0, "write": 0.0},
             "gpu_seconds": elapsed * ctl.world, "peak_memory": [0] * ctl.world, "model_load": False,
             "frames": frames, "width": width, "height": height, "fps": fps,
             "seed": run.params.seed}
    ctl.send(protocol.Done(job=job, output=str(output), stats=stats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", required=True)
    args, _unknown = parser.parse_known_args(argv)
    ctl = Control(args.socket)
    pid_dir = os.environ.get("FAKE_WORKER_PID_DIR")
    if pid_dir:  # so tests can check that the whole process group is gone after a kill
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / str(os.getpid())).write_text(args.model)
    knobs = knobs_for(None)
    ctl.send(protocol.Hello(model=args.model, world_size=ctl.world, pid=os.getpid(),
                            devices=[{"name": "fake-cpu", "memory_total": 0}] * ctl.world))
    if knobs.get("hang_on_load"):
        while True:
            time.sleep(3600)
    time.sleep(float(knobs["load_seconds"]))
    ctl.send(protocol.Ready(load_seconds=float(knobs["load_seconds"])))
    while True:
        msg = ctl.next_message()
        if msg is None or msg["type"] == "shutdown":
            return 0
        if msg["type"] == "run":
            run_job(ctl, protocol.to_message(msg))
            if ctl.shutdown_requested:
                return 0


if __name__ == "__main__":
    sys.exit(main())
