"""Bad manifests: each must be rejected with the exact field, value, expected text and line.

Real TOML text through the real parser, real files and symlinks in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from inbox_schema import MISSING, ManifestError, ManifestInvalid, load_manifest, parse_manifest_text

# Lines: 1 schema, 2 kind, 3 prompt, 4 blank, 5 [inputs], 6 image. Cases append from line 7.
I2V = 'schema = 1\nkind = "i2v"\nprompt = "a cat"\n\n[inputs]\nimage = "cat.jpg"\n'
# Lines: 1 schema, 2 kind, 3 blank, 4 [inputs], 5 character, 6 video. Cases append from line 7.
ANIMATE = 'schema = 1\nkind = "animate"\n\n[inputs]\ncharacter = "hero.png"\nvideo = "dance.mp4"\n'
TOP_KEYS = "schema, kind, name, priority, prompt, negative_prompt, inputs, video, sampling, notify, lora, animate"
PATH_RULE = 'a path relative to the manifest, with "/" between folders, e.g. "cat.jpg" or "media/cat.jpg"'
NAME_RULE = ('a name of at most 100 characters: letters, digits, ".", "_" and "-", '
             "starting with a letter or digit")


def top(extra: str) -> str:
    """I2V with `extra` as line 4, above the first table (where top-level keys must go)."""
    return I2V.replace("\n\n[inputs]", f"\n{extra}\n\n[inputs]")


def errors_of(text: str, base: Path, source: str = "job-under-test.toml", root: Path | None = None,
              ) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest_text(text, source, base, root)
    return caught.value.errors


# (id, manifest text, field, value, expected, line)
CASES = [
    ("missing schema", 'kind = "i2v"\nprompt = "x"\n[inputs]\nimage = "a.jpg"\n', "schema", MISSING,
     "schema = 1 (the manifest format version) at the top", None),
    ("unsupported schema", I2V.replace("schema = 1", "schema = 2"), "schema", 2,
     "1 (this wanbox reads schema 1 manifests)", 1),
    ("schema as string", I2V.replace("schema = 1", 'schema = "1"'), "schema", "1",
     "1 (a whole number, without quotes)", 1),
    ("unknown kind", I2V.replace('"i2v"', '"t2v"'), "kind", "t2v",
     'one of "i2v", "animate"; did you mean "i2v"?', 2),
    ("missing kind", I2V.replace('kind = "i2v"\n', ""), "kind", MISSING,
     'kind = "i2v" or kind = "animate"', None),
    ("top-level typo", top('negativ_prompt = "blurry"'), "negativ_prompt", "blurry",
     f'a key of the top level ({TOP_KEYS}); did you mean "negative_prompt"?', 4),
    ("table key at top level", 'frames = 81\n' + I2V, "frames", 81,
     f'a key of the top level ({TOP_KEYS}); did you mean "video.frames"? (put it under [video])', 1),
    ("top-level key below a table", I2V + "priority = 5\n", "inputs.priority", 5,
     'a key of [inputs] (image, character, video); "priority" is a top-level key: move it above the '
     "first [table] line", 7),
    ("unknown key in [video]", I2V + "\n[video]\nframe = 81\n", "video.frame", 81,
     'a key of [video] (size, frames, fps); did you mean "frames"?', 9),
    ("unknown key in [sampling]", I2V + "\n[sampling]\nguidance_scale = 5.0\n", "sampling.guidance_scale", 5.0,
     'a key of [sampling] (steps, shift, guide_scale, solver, seed, boundary, timesteps, preset); '
     'did you mean "guide_scale"?', 9),
    ("unknown key in [inputs.image]", I2V.replace('image = "cat.jpg"', '[inputs.image]\npath = "cat.jpg"\nsha = "x"'),
     "inputs.image.sha", "x", 'a key of [inputs.image] (path, sha256, size); did you mean "sha256"?', 8),
    ("wrong type", top('priority = "high"'), "priority", "high", "a whole number from -100 to 100", 4),
    ("frames not 4n+1", I2V + "\n[video]\nframes = 80\n", "video.frames", 80, "4n+1 (e.g. 81)", 9),
    ("frames not 4n+1 below", I2V + "\n[video]\nframes = 78\n", "video.frames", 78, "4n+1 (e.g. 77)", 9),
    ("frames too small", I2V + "\n[video]\nframes = 1\n", "video.frames", 1, "4n+1 from 5 to 161 (e.g. 5)", 9),
    ("frames too large", I2V + "\n[video]\nframes = 321\n", "video.frames", 321,
     "4n+1 from 5 to 161 (e.g. 161)", 9),
    ("frames as float", I2V + "\n[video]\nframes = 81.0\n", "video.frames", 81.0,
     "a whole number of the form 4n+1 from 5 to 161 (e.g. 81)", 9),
    ("size not a preset", I2V + '\n[video]\nsize = "1024*1024"\n', "video.size", "1024*1024",
     'one of "1280*720", "720*1280", "832*480", "480*832"', 9),
    ("size written with x", I2V + '\n[video]\nsize = "1280x720"\n', "video.size", "1280x720",
     'one of "1280*720", "720*1280", "832*480", "480*832"; did you mean "1280*720"?', 9),
    ("animate size not allowed", ANIMATE + '\n[video]\nsize = "480*832"\n', "video.size", "480*832",
     'one of "1280*720", "720*1280" for kind = "animate" (832*480 and 480*832 are i2v only)', 9),
    ("steps 0", I2V + "\n[sampling]\nsteps = 0\n", "sampling.steps", 0, "a whole number from 1 to 100", 9),
    ("negative shift", I2V + "\n[sampling]\nshift = -1.0\n", "sampling.shift", -1.0,
     "a number above 0 up to 100", 9),
    ("shift nan", I2V + "\n[sampling]\nshift = nan\n", "sampling.shift", "nan", "a number above 0 up to 100", 9),
    ("guide_scale of 3", I2V + "\n[sampling]\nguide_scale = [1.0, 2.0, 3.0]\n", "sampling.guide_scale",
     [1.0, 2.0, 3.0], "a number from 0 to 20, or [low_noise, high_noise] (two such numbers)", 9),
    ("guide_scale list for animate", ANIMATE + "\n[sampling]\nguide_scale = [1.0, 2.0]\n", "sampling.guide_scale",
     [1.0, 2.0], "one number above 0 up to 20 (animate has one model; 1.0 turns guidance off)", 9),
    # The Animate pipeline divides by the guide scale: 0 must be refused at validation, not on the GPU pool.
    ("guide_scale 0 for animate", ANIMATE + "\n[sampling]\nguide_scale = 0.0\n", "sampling.guide_scale", 0.0,
     "one number above 0 up to 20 (animate has one model; 1.0 turns guidance off)", 9),
    ("solver unknown", I2V + '\n[sampling]\nsolver = "ddim"\n', "sampling.solver", "ddim",
     'one of "unipc", "dpm++", "euler"', 9),
    ("euler without timesteps", I2V + '\n[sampling]\nsolver = "euler"\n', "sampling.solver", "euler",
     '"unipc" or "dpm++"; "euler" only together with sampling.timesteps = [...]', 9),
    ("timesteps without euler", I2V + "\n[sampling]\ntimesteps = [1000, 500]\n", "sampling.timesteps",
     [1000, 500], 'no timesteps with solver = "unipc" (explicit timesteps need solver = "euler")', 9),
    ("timesteps increasing", I2V + '\n[sampling]\nsolver = "euler"\ntimesteps = [250, 500]\n',
     "sampling.timesteps", [250, 500], "a list of 1 to 100 whole numbers from 1000 down to 1, strictly "
     "decreasing, e.g. [1000, 750, 500, 250]", 10),
    ("steps disagree with timesteps", I2V + '\n[sampling]\nsolver = "euler"\nsteps = 40\ntimesteps = [1000, 500]\n',
     "sampling.steps", 40, "2 (the length of sampling.timesteps), or leave steps out", 10),
    ("seed negative", I2V + "\n[sampling]\nseed = -1\n", "sampling.seed", -1,
     "a whole number from 0 to 9223372036854775807", 9),
    ("seed too large", I2V + "\n[sampling]\nseed = 9223372036854775808\n", "sampling.seed", 2**63,
     "a whole number from 0 to 9223372036854775807", 9),
    ("boundary 1.0", I2V + "\n[sampling]\nboundary = 1.0\n", "sampling.boundary", 1.0,
     "a number above 0 below 1", 9),
    ("boundary for animate", ANIMATE + "\n[sampling]\nboundary = 0.9\n", "sampling.boundary", 0.9,
     'no sampling.boundary with kind = "animate": it is only for kind = "i2v" '
     "(animate has one model, no expert switch)", 9),
    ("fps 0", I2V + "\n[video]\nfps = 0\n", "video.fps", 0, "a whole number from 1 to 60", 9),
    ("fps 120", ANIMATE + "\n[video]\nfps = 120\n", "video.fps", 120, "a whole number from 1 to 60", 9),
    ("refert_num 3", ANIMATE + "\n[animate]\nrefert_num = 3\n", "animate.refert_num", 3,
     "1 or 5 (frames carried over from one clip to the next)", 9),
    ("clip_len 80", ANIMATE + "\n[animate]\nclip_len = 80\n", "animate.clip_len", 80, "4n+1 (e.g. 81)", 9),
    ("clip_len leaves no new frames", ANIMATE + "\n[animate]\nrefert_num = 5\nclip_len = 5\n",
     "animate.clip_len", 5, "at least refert_num + 4 = 9 (each clip must add new frames)", 10),
    ("retarget with replacement", ANIMATE + '\n[animate]\nmode = "replacement"\nretarget = true\n',
     "animate.retarget", True, 'false with mode = "replacement" (retargeting only applies to mode = "animation")', 10),
    ("retarget as string", ANIMATE + '\n[animate]\nretarget = "yes"\n', "animate.retarget", "yes",
     "true or false (without quotes)", 9),
    ("relighting_lora as a word", ANIMATE + '\n[animate]\nrelighting_lora = "yes"\n', "animate.relighting_lora",
     "yes", 'true, false or "reference" (as the official code, which loads the LoRA but drops every key of it: '
     "not applied)", 9),
    ("mode typo", ANIMATE + '\n[animate]\nmode = "replace"\n', "animate.mode", "replace",
     'one of "animation", "replacement"; did you mean "replacement"?', 9),
    ("preprocess_fps 0", ANIMATE + "\n[animate]\npreprocess_fps = 0\n", "animate.preprocess_fps", 0,
     "a whole number from 1 to 60, or -1 for the video's own fps", 9),
    ("[animate] on i2v", I2V + '\n[animate]\nmode = "animation"\n', "animate", {"mode": "animation"},
     'no animate with kind = "i2v": it is only for kind = "animate" (set kind = "animate" to animate a character)', 8),
    ("video.frames for animate", ANIMATE + "\n[video]\nframes = 81\n", "video.frames", 81,
     'no video.frames with kind = "animate": it is only for kind = "i2v" (animate\'s length follows the '
     "driving video, in clips of animate.clip_len frames)", 9),
    ("image for animate", ANIMATE + 'image = "cat.jpg"\n', "inputs.image", "cat.jpg",
     'no inputs.image with kind = "animate": it is only for kind = "i2v" '
     "(animate takes inputs.character and inputs.video)", 7),
    ("missing image for i2v", I2V.replace('image = "cat.jpg"\n', ""), "inputs.image", MISSING,
     'a path like image = "cat.jpg", or a table with path, sha256 and size under [inputs] '
     "(the image this job needs)", 5),
    ("missing video for animate", ANIMATE.replace('video = "dance.mp4"\n', ""), "inputs.video", MISSING,
     'a path like video = "dance.mp4", or a table with path, sha256 and size under [inputs] '
     "(the video this job needs)", 4),
    ("missing character for animate", ANIMATE.replace('character = "hero.png"\n', ""), "inputs.character", MISSING,
     'a path like character = "hero.png", or a table with path, sha256 and size under [inputs] '
     "(the character this job needs)", 4),
    ("image as number", I2V.replace('"cat.jpg"', "3"), "inputs.image", 3,
     'a path like image = "cat.jpg", or a table with path, sha256 and size', 6),
    ("absolute path", I2V.replace('"cat.jpg"', '"/etc/cat.jpg"'), "inputs.image", "/etc/cat.jpg",
     PATH_RULE + ", not an absolute path: inputs must be inside the inbox", 6),
    ("home path", I2V.replace('"cat.jpg"', '"~/cat.jpg"'), "inputs.image", "~/cat.jpg",
     PATH_RULE + ", not an absolute path: inputs must be inside the inbox", 6),
    ("dot-dot path", I2V.replace('"cat.jpg"', '"media/../../cat.jpg"'), "inputs.image", "media/../../cat.jpg",
     PATH_RULE + ', without ".." (inputs must be inside the inbox, beside or below the manifest)', 6),
    ("backslash path", I2V.replace('"cat.jpg"', "'media\\cat.jpg'"), "inputs.image", "media\\cat.jpg",
     PATH_RULE + ' (no backslashes or drive letters: write "media/cat.jpg")', 6),
    ("drive letter", I2V.replace('"cat.jpg"', '"C:/cat.jpg"'), "inputs.image", "C:/cat.jpg",
     PATH_RULE + ' (no backslashes or drive letters: write "media/cat.jpg")', 6),
    ("temporary name", I2V.replace('"cat.jpg"', '"cat.jpg.part"'), "inputs.image", "cat.jpg.part",
     PATH_RULE + '; "cat.jpg.part" is a temporary or hidden name (dotfile, .part, .tmp, ~), which the daemon '
     "never reads: rename the file when its upload is complete", 6),
    ("hidden folder", I2V.replace('"cat.jpg"', '".~tmp~/cat.jpg"'), "inputs.image", ".~tmp~/cat.jpg",
     PATH_RULE + '; ".~tmp~" is a temporary or hidden name (dotfile, .part, .tmp, ~), which the daemon '
     "never reads: rename the file when its upload is complete", 6),
    ("wrong extension", I2V.replace('"cat.jpg"', '"cat.mp4"'), "inputs.image", "cat.mp4",
     "an image file (.jpg, .jpeg, .png, .webp, .bmp)", 6),
    ("bad sha256", I2V.replace('image = "cat.jpg"', '[inputs.image]\npath = "cat.jpg"\nsha256 = "abc123"'),
     "inputs.image.sha256", "abc123", "64 hexadecimal characters (the output of sha256sum)", 8),
    ("negative size", I2V.replace('image = "cat.jpg"', 'image = { path = "cat.jpg", size = -5 }'),
     "inputs.image.size", -5, "the file size in bytes, a whole number above 0", 6),
    ("long form without path", ANIMATE.replace('video = "dance.mp4"', '[inputs.video]\nsize = 10'),
     "inputs.video.path", MISSING, 'the file\'s path relative to the manifest, e.g. path = "media/cat.jpg"', 6),
    ("priority out of range", top("priority = 1000"), "priority", 1000, "a whole number from -100 to 100", 4),
    ("priority as bool", top("priority = true"), "priority", True, "a whole number from -100 to 100", 4),
    ("name with slash", top('name = "a/b"'), "name", "a/b", NAME_RULE, 4),
    ("empty prompt", I2V.replace('"a cat"', '"   "'), "prompt", "   ",
     "a non-empty string of at most 10000 characters", 3),
    ("missing prompt for i2v", I2V.replace('prompt = "a cat"\n', ""), "prompt", MISSING,
     'a non-empty string, e.g. prompt = "..."', None),
    ("empty negative prompt", top('negative_prompt = ""'), "negative_prompt", "",
     "a non-empty string of at most 10000 characters (leave the key out to use the reference's default)", 4),
    ("video not a table", I2V.replace("[inputs]", "video = 3\n[inputs]"), "video", 3,
     "a table: write [video] on its own line, then its keys below it", 5),
]


@pytest.mark.parametrize(("text", "field", "value", "expected", "line"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_manifest_reports_field_value_expected_line(tmp_path: Path, text: str, field: str, value: object,
                                                        expected: str, line: int | None) -> None:
    errors = errors_of(text, tmp_path)
    assert [(e.field, e.expected, e.line) for e in errors] == [(field, expected, line)]
    if isinstance(value, str) and value == "nan":
        assert errors[0].value != errors[0].value  # NaN is the one value unequal to itself
    else:
        assert errors[0].value == value and type(errors[0].value) is type(value)


def test_at_least_25_kinds_of_bad_manifests() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 25


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    errors = errors_of('schema = 1\nkind = "i2v"\nprompt = "unterminated\n', tmp_path)
    assert len(errors) == 1
    error = errors[0]
    assert (error.field, error.value, error.line) == ("toml", 'prompt = "unterminated', 3)
    assert error.column == 23
    assert error.expected == "valid TOML (Illegal character '\\n')"
    assert str(error) == 'toml = "prompt = \\"unterminated": expected valid TOML (Illegal character \'\\n\') (line 3, column 23)'


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    errors = errors_of(top('prompt = "again"'), tmp_path)
    assert [e.field for e in errors] == ["toml"]
    assert "Cannot overwrite a value" in errors[0].expected


def test_all_problems_are_collected_in_file_order(tmp_path: Path) -> None:
    text = top("priorty = 3") + '\n[video]\nframes = 80\nsize = "1x1"\n\n[sampling]\nsteps = 0\nseed = -2\n'
    errors = errors_of(text, tmp_path)
    assert [(e.field, e.line) for e in errors] == [
        ("priorty", 4), ("video.frames", 10), ("video.size", 11), ("sampling.steps", 14), ("sampling.seed", 15)]


def test_typo_of_a_required_key_reports_the_typo_and_the_missing_key(tmp_path: Path) -> None:
    errors = errors_of(I2V.replace("prompt =", "promt ="), tmp_path)
    assert [(e.field, e.value, e.line) for e in errors] == [("promt", "a cat", 3), ("prompt", MISSING, None)]
    assert errors[0].expected.endswith('did you mean "prompt"?')


def test_invalid_kind_still_reports_typos_and_common_fields(tmp_path: Path) -> None:
    errors = errors_of('schema = 1\nkind = "video"\npriority = 500\nsampling_steps = 3\n', tmp_path)
    assert [(e.field, e.line) for e in errors] == [("kind", 2), ("priority", 3), ("sampling_steps", 4)]


def test_unsupported_schema_stops_before_other_checks(tmp_path: Path) -> None:
    errors = errors_of('schema = 3\nkind = "nope"\nfoo = 1\n', tmp_path)
    assert [e.field for e in errors] == ["schema"]


def test_wrong_solver_does_not_also_blame_the_timesteps(tmp_path: Path) -> None:
    errors = errors_of(I2V + '\n[sampling]\nsolver = "eulr"\ntimesteps = [1000, 500]\n', tmp_path)
    assert [(e.field, e.expected) for e in errors] == [
        ("sampling.solver", 'one of "unipc", "dpm++", "euler"; did you mean "euler"?')]


def test_missing_schema_still_checks_the_rest_as_schema_1(tmp_path: Path) -> None:
    errors = errors_of(I2V.replace("schema = 1\n", "") + "\n[video]\nframes = 80\n", tmp_path)
    assert [(e.field, e.line) for e in errors] == [("video.frames", 8), ("schema", None)]


def test_name_from_unsafe_file_name_is_reported(tmp_path: Path) -> None:
    errors = errors_of(I2V, tmp_path, source="my cat.toml")
    assert [(e.field, e.value, e.line) for e in errors] == [("name", "my cat", None)]
    assert errors[0].expected == NAME_RULE + ' (taken from the file name; rename it or set name = "...")'


def test_name_from_unsafe_folder_name_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "my job"
    folder.mkdir()
    errors = errors_of(I2V, folder, source="job.toml", root=tmp_path)
    assert [(e.field, e.value) for e in errors] == [("name", "my job")]
    assert "taken from the folder name" in errors[0].expected


def _inbox_with_cat(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return inbox


def test_symlink_out_of_the_inbox_is_rejected_without_reading_it(tmp_path: Path) -> None:
    inbox = _inbox_with_cat(tmp_path)
    secret = tmp_path / "outside"
    secret.mkdir(mode=0o700)
    (inbox / "cat.jpg").symlink_to(secret / "cat.jpg")  # target does not even exist: never followed
    errors = errors_of(I2V, inbox, root=inbox)
    assert [(e.field, e.value, e.line) for e in errors] == [("inputs.image", "cat.jpg", 6)]
    assert errors[0].expected == ('a regular file, but "cat.jpg" is a symbolic link '
                                  "(copy the file into the inbox instead)")


def test_symlinked_folder_in_the_path_is_rejected(tmp_path: Path) -> None:
    inbox = _inbox_with_cat(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cat.jpg").write_bytes(b"jpeg")
    (inbox / "media").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    errors = errors_of(I2V.replace('"cat.jpg"', '"media/cat.jpg"'), inbox, root=inbox)
    assert [(e.field, e.value) for e in errors] == [("inputs.image", "media/cat.jpg")]
    assert '"media" is a symbolic link' in errors[0].expected


def test_symlink_inside_the_inbox_is_rejected_too(tmp_path: Path) -> None:
    # Decided policy: every symlink is rejected; accepted jobs are moved into work/, breaking links.
    inbox = _inbox_with_cat(tmp_path)
    (inbox / "real.jpg").write_bytes(b"jpeg")
    (inbox / "cat.jpg").symlink_to("real.jpg")
    errors = errors_of(I2V, inbox, root=inbox)
    assert [(e.field, e.value) for e in errors] == [("inputs.image", "cat.jpg")]


def test_manifest_folder_reached_by_symlink_is_rejected(tmp_path: Path) -> None:
    inbox = _inbox_with_cat(tmp_path)
    real = tmp_path / "real-job"
    real.mkdir()
    (real / "cat.jpg").write_bytes(b"jpeg")
    (inbox / "job").symlink_to(real, target_is_directory=True)
    errors = errors_of(I2V, inbox / "job", source="job.toml", root=inbox)
    assert [e.field for e in errors] == ["inputs.image"]
    assert '"job" is a symbolic link' in errors[0].expected


def test_input_that_is_a_folder_is_rejected(tmp_path: Path) -> None:
    inbox = _inbox_with_cat(tmp_path)
    (inbox / "cat.jpg").mkdir()
    errors = errors_of(I2V, inbox, root=inbox)
    assert errors[0].expected == 'a regular file, but "cat.jpg" is a folder or special file'


def test_manifest_outside_the_inbox_is_rejected(tmp_path: Path) -> None:
    inbox = _inbox_with_cat(tmp_path)
    errors = errors_of(I2V, tmp_path, root=inbox)
    assert [(e.field, e.value) for e in errors] == [("manifest", str(tmp_path))]


def test_not_utf8_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(I2V.replace("a cat", "un chat \xe9t\xe9").encode("latin-1"))
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(path)
    assert [(e.field, e.expected) for e in caught.value.errors] == [
        ("manifest", "UTF-8 text (save the file as UTF-8)")]


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(tmp_path / "gone.toml")
    assert caught.value.errors[0].field == "manifest"
    assert caught.value.errors[0].expected.startswith("a readable file")


def test_oversized_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text(I2V + "# " + "x" * 300_000 + "\n")
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(path)
    assert caught.value.errors[0].expected == "a manifest of at most 262144 bytes"


def test_error_rendering_is_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest_text(I2V + "\n[video]\nframes = 80\n", "cat.toml", tmp_path)
    assert str(caught.value) == "cat.toml: 1 problem\n  video.frames = 80: expected 4n+1 (e.g. 81) (line 9)"
    assert str(ManifestError("inputs.image", MISSING, "a path")) == "inputs.image is missing: expected a path"
    assert os.linesep not in str(caught.value.errors[0])


def test_random_edits_of_the_examples_never_crash(tmp_path: Path) -> None:
    # Whatever is dropped, the answer is a Job or ManifestInvalid with printable errors, never a traceback.
    examples = sorted((Path(__file__).parents[1] / "inbox_schema" / "examples").rglob("*.toml"))
    texts = [p.read_text(encoding="utf-8").splitlines() for p in examples]
    values = ["1", "-1", '"x"', "[1, 2]", "[]", "{}", "true", "nan", "1.5", '"../a.jpg"', "{ path = 3 }",
              "2024-01-01", "[[1]]", "99999999999999999999"]
    lines_to_add = ["[video]", "[animate]", "[inputs.image]", 'kind = "animate"', "frames = 81", "video = 3",
                    'inputs = "a"']
    rng = random.Random(20261121)
    outcomes = {"job": 0, "invalid": 0}
    for _ in range(400):
        lines = list(rng.choice(texts))
        k = rng.randrange(len(lines))
        if "=" in lines[k] and rng.random() < 0.6:
            lines[k] = lines[k].split("=")[0] + "= " + rng.choice(values)
        elif rng.random() < 0.5:
            del lines[k]
        else:
            lines.insert(k, rng.choice(lines_to_add))
        try:
            parse_manifest_text("\n".join(lines), "fuzz.toml", tmp_path, tmp_path, check_inputs=False)
            outcomes["job"] += 1
        except ManifestInvalid as invalid:
            assert invalid.errors and all(str(error) for error in invalid.errors)
            outcomes["invalid"] += 1
    assert outcomes["job"] > 50 and outcomes["invalid"] > 50
