"""The daemon's intake of LoRA jobs (a real `wanbox serve`, the fake pool worker): an uploaded LoRA is an input like
the image (the job waits for it, it moves into work/), a library LoRA is hashed at acceptance, and identical
resubmissions are recognised by LoRA content while a changed strength is a new job.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.workers.harness import Root, manifest_text, wait_for

pytestmark = pytest.mark.timeout(180)


def with_lora(entry: str, **kw: object) -> str:
    return manifest_text(**kw) + f"\n[[lora]]\n{entry}\n"


def library_job(entry: str = 'library = "style.safetensors"') -> str:
    return with_lora(entry, prompt="library", image='"lib.jpg"')


def test_lora_uploads_wait_move_and_library_files_are_hashed(tmp_path: Path) -> None:
    r = Root(tmp_path)
    library = r.root / "models" / "loras"
    library.mkdir(parents=True)
    (library / "style.safetensors").write_bytes(b"library LoRA bytes")
    upload = b"uploaded LoRA bytes"
    try:
        r.serve()
        # the manifest first, its LoRA upload later: staged until the file is there and settled
        r.drop("early", with_lora('path = "early_style.safetensors"\nstrength = 0.7'))
        r.wait_state("early", "staged")
        wait_for(lambda: "lora[0] = 'early_style.safetensors': the file is not in the inbox (yet)" in r.log_text(),
                 20, lambda: r.log_text()[-2000:])
        time.sleep(0.5)
        assert r.state("early") == "staged"
        temp = r.inbox / ".early_style.safetensors.part"
        temp.write_bytes(upload)
        os.rename(temp, r.inbox / "early_style.safetensors")
        early = r.wait_state("early", "done")
        stored = early.job.loras[0]
        assert (stored.source, stored.strength, stored.sha256) == ("upload", 0.7, hashlib.sha256(upload).hexdigest())
        assert stored.path == r.work / early.id / "inbox" / "early_style.safetensors" and stored.path.is_file()
        assert not (r.inbox / "early_style.safetensors").exists()

        # a library LoRA: its sha256 recorded at acceptance; the same job again is recognised by content
        r.drop("lib", library_job(), image="lib.jpg")
        lib = r.wait_state("lib", "done")
        assert lib.job.loras[0].sha256 == hashlib.sha256(b"library LoRA bytes").hexdigest()
        assert lib.job.loras[0].path == library / "style.safetensors"
        r.drop("lib-again", library_job(), image="lib.jpg")
        assert f"identical to job {lib.id}" in r.wait_state("lib-again", "rejected").last_error
        r.drop("lib-half", library_job('library = "style.safetensors"\nstrength = 0.5'),
               image="lib.jpg")
        assert r.wait_state("lib-half", ("done", "rejected")).state.value == "done"  # another strength: new job
        # a library file replaced by another version: same manifest, different content, a new job
        (library / "style.safetensors").write_bytes(b"library LoRA bytes, version 2")
        r.drop("lib-v2", library_job(), image="lib.jpg")
        v2 = r.wait_state("lib-v2", ("done", "rejected"))
        assert v2.state.value == "done" and v2.job.loras[0].sha256 != lib.job.loras[0].sha256
        assert r.stop() == 0
    finally:
        r.cleanup()
