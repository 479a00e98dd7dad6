"""Good manifests: defaults resolved per kind, paths resolved, the JSON form, the content hash.

Real TOML text and real files in tmp_path; the expected values come from the reference (WAN_SPEC).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from inbox_schema import (
    MISSING,
    Job,
    ManifestError,
    ManifestInvalid,
    is_temporary_name,
    load_manifest,
    manifest_hash,
    parse_manifest_text,
    render_errors,
)
from inbox_schema.defaults import DEFAULT_ANIMATE_PROMPT, DEFAULT_NEGATIVE_PROMPT
from inbox_schema.lines import KeyLines

I2V = 'schema = 1\nkind = "i2v"\nprompt = "a cat"\n\n[inputs]\nimage = "cat.jpg"\n'
ANIMATE = 'schema = 1\nkind = "animate"\n\n[inputs]\ncharacter = "hero.png"\nvideo = "dance.mp4"\n'
SHA_A = "a" * 64
SHA_B = "b" * 64


def parse(text: str, base: Path, source: str = "cat.toml") -> Job:
    return parse_manifest_text(text, source, base, base)


def test_i2v_defaults_are_the_reference_config(tmp_path: Path) -> None:
    job = parse(I2V, tmp_path)
    assert (job.schema, job.kind, job.model_id, job.name, job.priority) == (1, "i2v", "i2v-A14B", "cat", 0)
    assert job.prompt == "a cat"
    assert job.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert job.negative_prompt.startswith("色调艳丽，过曝") and job.negative_prompt.endswith("倒着走")
    assert (job.video.size, job.video.frames, job.video.fps, job.video.max_area) == ("1280*720", 81, 16, 921_600)
    s = job.sampling
    assert (s.steps, s.shift, s.guide_scale, s.solver, s.seed, s.boundary, s.timesteps) == (
        40, 5.0, (3.5, 3.5), "unipc", None, 0.9, None)
    assert job.options is None
    assert job.inputs["image"].path == tmp_path.resolve() / "cat.jpg"


def test_animate_defaults_are_the_reference_config(tmp_path: Path) -> None:
    job = parse(ANIMATE, tmp_path, "dance.toml")
    assert (job.kind, job.model_id, job.name) == ("animate", "animate-14B", "dance")
    assert job.prompt == DEFAULT_ANIMATE_PROMPT == "视频中的人在做动作"
    assert (job.video.size, job.video.frames, job.video.fps) == ("1280*720", None, 30)
    s = job.sampling
    assert (s.steps, s.shift, s.guide_scale, s.solver, s.boundary) == (20, 5.0, 1.0, "unipc", None)
    a = job.options
    assert a is not None
    assert (a.mode, a.refert_num, a.clip_len, a.retarget, a.relighting_lora, a.preprocess_fps) == (
        "animation", 1, 77, False, False, 30)
    assert sorted(job.inputs) == ["character", "video"]


def test_animate_output_fps_follows_preprocess_fps(tmp_path: Path) -> None:
    assert parse(ANIMATE + "\n[animate]\npreprocess_fps = 24\n", tmp_path).video.fps == 24
    assert parse(ANIMATE + "\n[animate]\npreprocess_fps = -1\n", tmp_path).video.fps is None
    explicit = parse(ANIMATE + "\n[video]\nfps = 25\n[animate]\npreprocess_fps = -1\n", tmp_path)
    assert explicit.video.fps == 25


def test_every_setting_written_out(tmp_path: Path) -> None:
    text = '''schema = 1
kind = "i2v"
name = "beach-02"
priority = -7
prompt = """multi
line = not a key"""
negative_prompt = "blurry"

[inputs.image]
path = "media/cat.PNG"
sha256 = "%s"
size = 1234

[video]
size = "480*832"
frames = 5
fps = 24

[sampling]
steps = 8
shift = 3
guide_scale = [2.0, 4]
solver = "dpm++"
seed = 0
boundary = 0.875
''' % ("AB" * 32)
    job = parse(text, tmp_path)
    assert (job.name, job.priority, job.prompt, job.negative_prompt) == ("beach-02", -7, "multi\nline = not a key", "blurry")
    image = job.inputs["image"]
    assert (image.relpath, image.sha256, image.size) == ("media/cat.PNG", "ab" * 32, 1234)
    assert image.path == tmp_path.resolve() / "media" / "cat.PNG"
    assert (job.video.width, job.video.height, job.video.frames, job.video.fps) == (480, 832, 5, 24)
    s = job.sampling
    assert (s.steps, s.shift, s.guide_scale, s.solver, s.seed, s.boundary) == (8, 3.0, (2.0, 4.0), "dpm++", 0, 0.875)
    assert isinstance(s.shift, float) and all(isinstance(g, float) for g in s.guide_scale)  # type: ignore[union-attr]


def test_single_guide_scale_applies_to_both_experts(tmp_path: Path) -> None:
    job = parse(I2V + "\n[sampling]\nguide_scale = 5\n", tmp_path)
    assert job.sampling.guide_scale == (5.0, 5.0)


def test_euler_with_timesteps_sets_steps(tmp_path: Path) -> None:
    job = parse(I2V + '\n[sampling]\nsolver = "euler"\ntimesteps = [1000, 750, 500, 250]\n', tmp_path)
    assert (job.sampling.solver, job.sampling.timesteps, job.sampling.steps) == ("euler", (1000, 750, 500, 250), 4)


def test_animate_replacement_settings(tmp_path: Path) -> None:
    job = parse(ANIMATE + '\n[animate]\nmode = "replacement"\nrefert_num = 5\nclip_len = 9\nrelighting_lora = true\n',
                tmp_path)
    assert job.options is not None
    assert (job.options.mode, job.options.refert_num, job.options.clip_len, job.options.relighting_lora) == (
        "replacement", 5, 9, True)


def test_inline_table_inputs_and_dot_slash(tmp_path: Path) -> None:
    text = ANIMATE.replace('"hero.png"', '{ path = "./chars/hero.webp" }')
    job = parse(text, tmp_path)
    assert job.inputs["character"].path == tmp_path.resolve() / "chars" / "hero.webp"
    assert job.inputs["character"].relpath == "./chars/hero.webp"


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    assert parse("\ufeff" + I2V, tmp_path).kind == "i2v"


def test_folder_layout_takes_the_folder_name_and_resolves_below_it(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = inbox / "sunset-surf"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(b"not checked here")
    manifest = folder / "job.toml"
    manifest.write_text(I2V, encoding="utf-8")
    job = load_manifest(manifest, inbox)
    assert job.name == "sunset-surf"
    assert job.inputs["image"].path == folder.resolve() / "cat.jpg"


def test_existing_regular_input_passes_disk_checks(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "cat.jpg").write_bytes(b"jpeg")
    job = parse(I2V.replace('"cat.jpg"', '"media/cat.jpg"'), tmp_path)
    assert job.inputs["image"].path.is_file()


def test_check_inputs_false_skips_the_disk(tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").symlink_to("/nonexistent/elsewhere.jpg")
    job = parse_manifest_text(I2V, "cat.toml", tmp_path, tmp_path, check_inputs=False)
    assert job.inputs["image"].relpath == "cat.jpg"
    with pytest.raises(ManifestInvalid):
        parse_manifest_text(I2V, "cat.toml", tmp_path, tmp_path, check_inputs=True)


def test_with_seed_and_json_round_trip(tmp_path: Path) -> None:
    job = parse(ANIMATE + '\n[animate]\nmode = "replacement"\n', tmp_path)
    seeded = job.with_seed(123456789)
    assert (job.seed, seeded.seed, seeded.sampling.steps) == (None, 123456789, 20)
    data = json.loads(json.dumps(seeded.to_dict()))
    assert data["model_id"] == "animate-14B" and data["sampling"]["seed"] == 123456789
    assert data["inputs"]["video"]["path"] == str(tmp_path.resolve() / "dance.mp4")
    assert Job.from_dict(data) == seeded
    i2v = parse(I2V + '\n[sampling]\nsolver = "euler"\ntimesteps = [900, 10]\n', tmp_path)
    assert Job.from_dict(json.loads(json.dumps(i2v.to_dict()))) == i2v


def test_key_lines_follow_tables_and_skip_multiline_strings() -> None:
    text = 'a = """\nx = 1\n"""\n[video]\nframes = 3\n[inputs.image]\n"path" = "p"\n[sampling]\nguide_scale = [\n 1,\n]\n'
    lines = KeyLines(text)
    assert lines.line_of("a") == 1
    assert lines.line_of("x") is None
    assert lines.line_of("video.frames") == 5
    assert lines.line_of("inputs.image.path") == 7
    assert lines.line_of("inputs.image.sha256") == 6
    assert lines.line_of("sampling.guide_scale") == 9
    assert lines.line_of("animate.mode") is None


def test_temporary_names() -> None:
    for name in (".cat.jpg.Xa81bC", "cat.jpg.part", "cat.JPG.FILEPART", "x.tmp", "x~", ".DS_Store", "Thumbs.db"):
        assert is_temporary_name(name), name
    for name in ("cat.jpg", "job.toml", "my-video.mp4", "a.partition.png"):
        assert not is_temporary_name(name), name


def test_manifest_error_rendering() -> None:
    error = ManifestError("video.frames", 80, "4n+1 (e.g. 81)", 9)
    assert str(error) == "video.frames = 80: expected 4n+1 (e.g. 81) (line 9)"
    assert str(ManifestError("prompt", "hi", "x")) == 'prompt = "hi": expected x'
    assert str(ManifestError("animate.retarget", True, "false")) == "animate.retarget = true: expected false"
    assert error.to_dict()["message"] == str(error)


def test_errors_survive_pickling_between_processes(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse(I2V.replace('image = "cat.jpg"\n', "") + "\n[video]\nframes = 80\n", tmp_path)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.errors == caught.value.errors and copy.source_name == "cat.toml"
    assert copy.errors[0].value is MISSING and str(copy) == str(caught.value)


def test_windows_line_endings_keep_line_numbers(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse((I2V + "\n[video]\nframes = 80\n").replace("\n", "\r\n"), tmp_path)
    assert [(e.field, e.line) for e in caught.value.errors] == [("video.frames", 9)]


def test_render_errors_says_what_and_how_to_resubmit() -> None:
    errors = [ManifestError("video.frames", 80, "4n+1 (e.g. 81)", 9), "inputs.image: not complete after 600 s"]
    text = render_errors(errors, "cat.toml")
    assert text.startswith("wanbox could not accept cat.toml: 2 problems.\n")
    assert "  * video.frames = 80: expected 4n+1 (e.g. 81) (line 9)\n" in text
    assert "  * inputs.image: not complete after 600 s\n" in text
    assert "wanbox validate" in text and "wanbox submit" in text and "manifest last" in text


def _hash(text: str, image: str = SHA_A) -> str:
    return manifest_hash(text.encode("utf-8"), {"image": image})


def test_hash_ignores_layout_defaults_name_priority_and_file_names() -> None:
    base = _hash(I2V)
    assert base == _hash(I2V.replace("[inputs]", "name = 'other'\npriority = 9\n[inputs]"))
    assert base == _hash("# comment\n" + I2V.replace('image = "cat.jpg"', 'image = { path = "in/x.png" }'))
    assert base == _hash(I2V + "\n[video]\nframes = 81\nsize = '1280*720'\n[sampling]\nsteps = 40\n")
    assert base == _hash(I2V + "\n[video]\nsize = '720*1280'\n")  # only the area is used


def test_hash_changes_with_anything_that_changes_the_video() -> None:
    base = _hash(I2V)
    changed = [
        _hash(I2V, image=SHA_B),
        _hash(I2V.replace("a cat", "a dog")),
        _hash(I2V + "\n[sampling]\nseed = 1\n"),
        _hash(I2V + "\n[video]\nframes = 49\n"),
        _hash(I2V + "\n[video]\nsize = '832*480'\n"),
        _hash(I2V + "\n[sampling]\nguide_scale = [3.5, 4.0]\n"),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_hash_checks_its_input_roles() -> None:
    with pytest.raises(ValueError, match="expected exactly"):
        manifest_hash(ANIMATE.encode(), {"character": SHA_A})
    with pytest.raises(ValueError, match="64 hexadecimal"):
        manifest_hash(I2V.encode(), {"image": "abc"})
    with pytest.raises(ManifestInvalid):
        manifest_hash(b"schema = 1\n", {"image": SHA_A})
    assert manifest_hash(I2V.encode(), {"image": SHA_A.upper()}) == _hash(I2V)


def test_hash_value_is_pinned() -> None:
    # The ledger keeps these hashes across upgrades: a silent change of the canonical form would stop
    # recognising resubmissions. Change HASH_VERSION and this value together, on purpose.
    image = hashlib.sha256(b"x").hexdigest()
    expected = "d3125c47fa5be3d71fede2fc0a7869783847b005bf5c6df72a7ffda55924d0f0"
    assert _hash(I2V, image=image) == expected
    assert _hash(I2V.replace("cat.jpg", "renamed.jpg"), image=image) == expected


def test_relighting_lora_reference_is_the_official_behaviour(tmp_path: Path) -> None:
    job = parse(ANIMATE + '\n[animate]\nrelighting_lora = "reference"\n', tmp_path)
    assert job.options.relighting_lora == "reference"
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
