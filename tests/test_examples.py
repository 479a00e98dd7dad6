"""The shipped example manifests validate against real media, through the API, the CLI and the JSON Schema.

Examples are copied into a tmp inbox beside copies of the real test media (../shared/media); the
committed manifest.schema.json must equal json_schema(), and agree with load_manifest on bad cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inbox_schema
from inbox_schema import ManifestInvalid, json_schema, load_manifest, parse_manifest_text
from inbox_schema.cli import input_warnings, main
from inbox_schema.jsonschema import json_schema_text
from inbox_schema.manifest import tomllib

EXAMPLES = Path(inbox_schema.__file__).parent / "examples"
TINY_LORA = "a tiny LoRA file"  # written by the fixture (safetensors): validation checks presence, not content
SCHEMA_FILE = Path(inbox_schema.__file__).parent / "manifest.schema.json"
# example -> {path in the inbox, relative to the example's folder: media file it is made from}
MEDIA_FOR = {
    "i2v_minimal.toml": {"cat.jpg": "i2v_input.jpg"},
    "i2v_full.toml": {"media/i2v_input.jpg": "i2v_input.jpg"},
    "surfing-cat/job.toml": {"cat.jpg": "i2v_input.jpg"},
    "animate_animation.toml": {"hero.png": "animate_character.jpg", "dance.mp4": "animate_driving.mp4"},
    "animate_replacement.toml": {"hero.png": "animate_character.jpg", "dance.mp4": "animate_driving.mp4"},
    "i2v_lightning.toml": {"cat.jpg": "i2v_input.jpg"},
    "watercolor-cat/job.toml": {"cat.jpg": "i2v_input.jpg", "watercolor.safetensors": TINY_LORA},
    "animate_lightning.toml": {"hero.png": "animate_character.jpg", "dance.mp4": "animate_driving.mp4"},
}


def test_every_example_is_covered() -> None:
    found = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.toml"))
    assert found == sorted(MEDIA_FOR)


@pytest.fixture(scope="module")
def prepared_inbox(tmp_path_factory: pytest.TempPathFactory, media: Path) -> Path:
    """The examples with their media beside them, as a user would drop them (built once: PNG encoding is slow)."""
    inbox = tmp_path_factory.mktemp("prepared") / "inbox"
    shutil.copytree(EXAMPLES, inbox)
    for example, files in MEDIA_FOR.items():
        folder = (inbox / example).parent
        for target, source in files.items():
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            if source == TINY_LORA:
                from safetensors.numpy import save_file

                save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.ones((4, 64), np.float32),
                           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": np.ones((64, 4), np.float32)},
                          str(folder / target))
            elif target.endswith(".png"):
                Image.open(media / source).save(folder / target)  # a real PNG, not a renamed JPEG
            else:
                shutil.copyfile(media / source, folder / target)
    return inbox


@pytest.fixture()
def inbox(prepared_inbox: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so a test may change or delete files."""
    return Path(shutil.copytree(prepared_inbox, tmp_path / "inbox"))


@pytest.mark.parametrize("example", sorted(MEDIA_FOR))
def test_example_validates_with_its_media(inbox: Path, example: str) -> None:
    job = load_manifest(inbox / example, inbox)
    assert input_warnings(job) == []  # present, and i2v_full's sha256/size match the real photo
    assert sorted(job.inputs) == (["image"] if job.kind == "i2v" else ["character", "video"])
    for item in job.files().values():
        assert item.path.is_file() and item.path.is_relative_to(inbox.resolve())


def test_lora_examples_resolve_to_what_they_say(inbox: Path) -> None:
    lightning = load_manifest(inbox / "i2v_lightning.toml", inbox)
    s = lightning.sampling
    assert (s.preset, s.steps, s.solver, s.timesteps, s.shift, s.guide_scale, s.boundary) == (
        "lightning-4step", 4, "euler", (1000, 750, 500, 250), 5.0, (1.0, 1.0), 0.9)
    assert [(lora.source, lora.experts, lora.strength) for lora in lightning.loras] == [
        ("library", ("high_noise",), 1.0), ("library", ("low_noise",), 1.0)]
    styled = load_manifest(inbox / "watercolor-cat" / "job.toml", inbox)
    (style,) = styled.loras
    assert (style.source, style.experts, style.strength) == ("upload", ("high_noise", "low_noise"), 0.8)
    assert style.path == inbox.resolve() / "watercolor-cat" / "watercolor.safetensors"
    assert list(styled.files()) == ["image", "lora[0]"]
    animate = load_manifest(inbox / "animate_lightning.toml", inbox)
    assert (animate.sampling.steps, animate.sampling.solver, animate.loras[0].experts) == (4, "unipc", ())


def test_examples_resolve_to_what_they_say(inbox: Path) -> None:
    full = load_manifest(inbox / "i2v_full.toml", inbox)
    assert (full.name, full.priority, full.video.size, full.sampling.guide_scale) == (
        "surfing-cat-480p", 10, "832*480", (3.0, 4.0))
    assert full.inputs["image"].sha256 == "077e3d965090c9028c69c00931675f42e1acc815c6eb450ab291b3b72d211a8e"
    assert load_manifest(inbox / "surfing-cat" / "job.toml", inbox).name == "surfing-cat"
    replacement = load_manifest(inbox / "animate_replacement.toml", inbox)
    assert replacement.options is not None and replacement.options.mode == "replacement"
    assert (replacement.video.fps, replacement.sampling.solver) == (None, "dpm++")
    animation = load_manifest(inbox / "animate_animation.toml", inbox)
    assert animation.options is not None and animation.options.retarget is True


def test_changed_media_is_a_warning_not_an_error(inbox: Path) -> None:
    (inbox / "media" / "i2v_input.jpg").write_bytes(b"half an upload")
    job = load_manifest(inbox / "i2v_full.toml", inbox)
    assert input_warnings(job) == [
        "inputs.image.size = 250628: expected the file's size, but the file has 14 bytes"]
    (inbox / "media" / "i2v_input.jpg").write_bytes(b"x" * 250628)
    assert input_warnings(job) == [
        "inputs.image.sha256 = \"077e3d965090c9028c69c00931675f42e1acc815c6eb450ab291b3b72d211a8e\": expected the "
        f"file's sha256, but the file has {hashlib.sha256(b'x' * 250628).hexdigest()}"]
    (inbox / "media" / "i2v_input.jpg").unlink()
    assert input_warnings(job) == ['inputs.image = "media/i2v_input.jpg": expected an existing file beside the '
                                   "manifest (not found yet: upload the media before the manifest)"]


def test_cli_prints_the_resolved_job(inbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(inbox / "i2v_minimal.toml"), "--inbox-root", str(inbox)])
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == load_manifest(inbox / "i2v_minimal.toml", inbox).to_dict()
    assert "a random seed is drawn" in err and "warning" not in err


def test_cli_reports_every_problem_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('schema = 1\nkind = "i2v"\nprompt = "x"\n[inputs]\nimage = "/abs.jpg"\n[video]\nframes = 80\n')
    code = main([str(bad)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == "bad.toml: 2 problems"
    assert "  video.frames = 80: expected 4n+1 (e.g. 81) (line 7)" in err.splitlines()
    assert any(line.startswith('  inputs.image = "/abs.jpg"') and line.endswith("(line 5)") for line in err.splitlines())


def test_python_dash_m_runs_the_cli(inbox: Path) -> None:
    manifest = inbox / "animate_animation.toml"
    done = subprocess.run([sys.executable, "-m", "inbox_schema", str(manifest), "--inbox-root", str(inbox)],
                          capture_output=True, text=True, timeout=60, cwd=Path(inbox_schema.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["animate"]["retarget"] is True


def test_committed_json_schema_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), (
        "regenerate with: python -m inbox_schema --json-schema > inbox_schema/manifest.schema.json")
    assert main(["--json-schema"]) == 0
    assert capsys.readouterr().out == json_schema_text()


# A small JSON Schema checker for the keywords our schema uses (no validator package is a dependency).
def schema_accepts(schema: object, value: object) -> bool:
    if isinstance(schema, bool):
        return schema
    assert isinstance(schema, dict)
    return all(_KEYWORDS[key](schema, value) for key in schema if key in _KEYWORDS) and _conditional(schema, value)


def _type_ok(name: str, value: object) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "boolean": isinstance(value, bool), "integer": is_int,
            "number": is_int or isinstance(value, float)}[name]


def _numeric(value: object) -> bool:
    return _type_ok("number", value)


def _conditional(schema: dict, value: object) -> bool:
    if "if" not in schema:
        return True
    branch = "then" if schema_accepts(schema["if"], value) else "else"
    return schema_accepts(schema.get(branch, True), value)


_KEYWORDS = {
    "type": lambda s, v: _type_ok(s["type"], v),
    "const": lambda s, v: type(v) is type(s["const"]) and v == s["const"],
    "enum": lambda s, v: any(type(v) is type(e) and v == e for e in s["enum"]),
    "pattern": lambda s, v: not isinstance(v, str) or re.search(s["pattern"], v) is not None,
    "minLength": lambda s, v: not isinstance(v, str) or len(v) >= s["minLength"],
    "maxLength": lambda s, v: not isinstance(v, str) or len(v) <= s["maxLength"],
    "minimum": lambda s, v: not _numeric(v) or v >= s["minimum"],
    "maximum": lambda s, v: not _numeric(v) or v <= s["maximum"],
    "exclusiveMinimum": lambda s, v: not _numeric(v) or v > s["exclusiveMinimum"],
    "exclusiveMaximum": lambda s, v: not _numeric(v) or v < s["exclusiveMaximum"],
    "minItems": lambda s, v: not isinstance(v, list) or len(v) >= s["minItems"],
    "maxItems": lambda s, v: not isinstance(v, list) or len(v) <= s["maxItems"],
    "items": lambda s, v: not isinstance(v, list) or all(schema_accepts(s["items"], i) for i in v),
    "required": lambda s, v: not isinstance(v, dict) or all(k in v for k in s["required"]),
    "properties": lambda s, v: not isinstance(v, dict) or all(
        schema_accepts(sub, v[k]) for k, sub in s["properties"].items() if k in v),
    "additionalProperties": lambda s, v: not isinstance(v, dict) or all(
        schema_accepts(s["additionalProperties"], v[k]) for k in v if k not in s.get("properties", {})),
    "allOf": lambda s, v: all(schema_accepts(sub, v) for sub in s["allOf"]),
    "anyOf": lambda s, v: any(schema_accepts(sub, v) for sub in s["anyOf"]),
    "oneOf": lambda s, v: sum(schema_accepts(sub, v) for sub in s["oneOf"]) == 1,
    "not": lambda s, v: not schema_accepts(s["not"], v),
}


@pytest.mark.parametrize("example", sorted(MEDIA_FOR))
def test_examples_match_the_json_schema(example: str) -> None:
    data = tomllib.loads((EXAMPLES / example).read_text(encoding="utf-8"))
    assert json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema_accepts(json_schema(), data)


# What JSON Schema cannot see: files on disk, names derived from file names, and rules between
# fields that our schema leaves to load_manifest. Every other bad case must fail the schema too.
SCHEMA_BLIND = {"clip_len leaves no new frames", "steps disagree with timesteps", "timesteps increasing"}


def test_json_schema_rejects_the_bad_manifests_load_manifest_rejects(tmp_path: Path) -> None:
    from test_manifest_bad import CASES

    checked = 0
    for case_id, text, *_ in CASES:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        with pytest.raises(ManifestInvalid):
            parse_manifest_text(text, "case.toml", tmp_path, tmp_path)
        accepted = schema_accepts(json_schema(), data)
        assert accepted == (case_id in SCHEMA_BLIND), case_id
        checked += 1
    assert checked >= 25


def test_json_schema_accepts_the_extremes_load_manifest_accepts(tmp_path: Path) -> None:
    text = ('schema = 1\nkind = "i2v"\nprompt = "p"\n[inputs]\nimage = "a/b.JPEG"\n[video]\nframes = 161\nfps = 60\n'
            '[sampling]\nsolver = "euler"\ntimesteps = [1000, 1]\nseed = 9223372036854775807\nshift = 100\n')
    parse_manifest_text(text, "case.toml", tmp_path, tmp_path)
    assert schema_accepts(json_schema(), tomllib.loads(text))
    assert not math.isnan(json_schema()["properties"]["sampling"]["properties"]["shift"]["maximum"])
