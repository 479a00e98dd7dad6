"""A kind is one registry entry plus its own modules: a throwaway kind defined in the tests (tests/kinds/echo.py)
goes through validation, the ledger and a real `wanbox serve` with the real pool worker, untouched wanbox code.

Also: every list of kinds and models (config, worker, protocol, layouts, CLI) is the registry's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.outbox import probe_video
from inbox_schema import ManifestInvalid, kinds, model_ids, parse_manifest_text
from inbox_schema.kinds import PLUGINS_ENV, register, unregister
from pipeline.sampling import SOLVER_CLASSES, SOLVERS
from tests.workers.harness import Root, write_image

ECHO_MANIFEST = 'schema = 1\nkind = "echo"\nname = "still-life"\n[inputs]\nstill = "pear.png"\n[video]\nframes = 9\n'


@pytest.fixture()
def echo() -> Iterator[None]:
    from tests.kinds.echo import ECHO

    register(ECHO)
    yield
    unregister("echo")


def test_every_list_of_kinds_is_the_registry() -> None:
    from daemon.cli import build_parser
    from daemon.config import parse_config
    from pipeline.weights.layouts import families
    from pipeline.worker import parse_args

    assert model_ids() == ("i2v-A14B", "animate-14B") and tuple(kinds()) == ("i2v", "animate")
    assert tuple(families()) == model_ids()
    cfg = parse_config({"pool": {"checkpoint_dirs": {m: "x" for m in model_ids()}}}, root=Path("/r"))
    assert set(cfg.pool.checkpoint_dirs) == set(model_ids())
    assert parse_args(["--model", "animate-14B", "--socket", "s", "--checkpoint-dir", "d"]).model == "animate-14B"
    models = build_parser("models")._subparsers._group_actions[0].choices["models"]  # noqa: SLF001
    assert next(a for a in models._actions if a.dest == "family").choices == list(model_ids())  # noqa: SLF001
    assert set(SOLVER_CLASSES) == set(SOLVERS)  # one list of solvers: the contract's names, each implemented


def test_a_registered_kind_validates_with_its_own_rules(echo: None, tmp_path: Path) -> None:
    job = parse_manifest_text(ECHO_MANIFEST, "still-life.toml", tmp_path, check_inputs=False)
    assert (job.kind, job.model_id, job.video.size, job.video.frames, job.video.fps) == ("echo", "echo-1", "64*64", 9, 8)
    assert job.prompt == ""  # echo's entry gives an empty default prompt: the manifest need not have one
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest_text(ECHO_MANIFEST + "[sampling]\nboundary = 0.5\n", "x.toml", tmp_path, check_inputs=False)
    assert 'no sampling.boundary with kind = "echo": it is only for kind = "i2v" (echo has one model, no expert ' \
           'switch)' in str(caught.value)
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest_text(ECHO_MANIFEST.replace('"echo"', '"ecco"'), "x.toml", tmp_path, check_inputs=False)
    assert 'one of "i2v", "animate", "echo"; did you mean "echo"?' in str(caught.value)


@pytest.mark.slow
def test_a_registered_kind_runs_through_the_daemon_and_the_real_worker(echo: None, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "tests.kinds.echo")  # the daemon, its CPU pool and the pool worker import it
    command = ["{python}", "-m", "pipeline.worker", "--model", "{model}", "--socket", "{socket}",
               "--checkpoint-dir", "{checkpoint_dir}", "--device", "cpu"]
    r = Root(tmp_path, pool={"command": command, "env": {}})
    try:
        write_image(r.inbox / "pear.png")
        r.serve()
        r.drop("still-life", ECHO_MANIFEST, image=None)
        deadline = time.monotonic() + 90
        while r.state("still-life") != "done" and time.monotonic() < deadline:
            assert r.state("still-life") not in ("failed", "rejected"), r.log_text()[-3000:]
            time.sleep(0.3)
        assert r.state("still-life") == "done", r.log_text()[-3000:]
        info = probe_video(r.outbox / "still-life.mp4")
        assert (info.frames, info.width, info.height, info.fps) == (9, 64, 64, 8.0)
        sidecar = json.loads((r.outbox / "still-life.json").read_text())
        assert (sidecar["kind"], sidecar["model_id"], sidecar["parameters"]["video"]["frames"]) == ("echo", "echo-1", 9)
        assert r.job("still-life").timings_json["preprocess"] > 0
    finally:
        if r.proc is not None:
            r.stop()
        r.cleanup()
