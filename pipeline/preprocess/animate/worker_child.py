"""The mediapipe worker process's main loop: requests in on stdin, RawDetections out on the original stdout.

Runs only as `python -m pipeline.preprocess.animate.worker_child`, started and killed by worker.DetectorProcess;
it must not be imported by the parent (that would load mediapipe there).
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection


def _serve(requests: Connection, replies: Connection, models: dict[str, str], segment: bool) -> None:
    """Child main loop: ("video", frames, timestamps) / ("image", frame) / ("stop",)."""
    from pipeline.preprocess.animate.detect import Detector

    detectors: dict[bool, Detector] = {}
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message[0] == "stop":
            for detector in detectors.values():
                detector.close()  # closing explicitly avoids mediapipe's noisy __del__ at exit
            return
        try:
            video = message[0] == "video"
            if video not in detectors:
                detectors[video] = Detector(models, video=video, segment=segment)
            if video:
                found = [detectors[True].detect(frame, ts) for frame, ts in zip(message[1], message[2], strict=True)]
            else:
                found = [detectors[False].detect(message[1])]
            replies.send(("ok", found))
        except Exception as exc:  # report every mediapipe failure to the parent, which kills this process
            replies.send(("error", f"{type(exc).__name__}: {exc}"))


def _exit_when_orphaned(parent: int, interval_s: float = 1.0) -> None:
    """A hung mediapipe call never returns to read stdin's EOF, so a daemon thread ends the process as soon as
    its parent is gone (killed with SIGKILL, say) instead of leaving an orphan spinning on a core."""
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            os._exit(3)


def main() -> None:
    """Entry of the child process: requests on stdin, replies on the original stdout; anything the libraries
    print goes to stderr so it cannot corrupt the reply stream."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    replies_fd = os.dup(1)
    os.dup2(2, 1)
    requests = Connection(os.dup(0), writable=False)
    replies = Connection(replies_fd, readable=False)
    models, segment = requests.recv()
    _serve(requests, replies, models, segment)


if __name__ == "__main__":
    main()
