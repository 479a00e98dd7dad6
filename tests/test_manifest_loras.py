"""[[lora]] entries and [sampling] presets in the manifest: what they resolve to, how explicit fields override a
preset, every wrong value with its field and reason, the library's confinement, the content hash, the stored form,
the JSON Schema and `wanbox validate`'s notes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from inbox_schema import Job, ManifestInvalid, json_schema, manifest_hash, parse_manifest_text
from inbox_schema.cli import main as validate
from inbox_schema.manifest import tomllib
from tests.test_examples import schema_accepts

I2V = 'schema = 1\nkind = "i2v"\nprompt = "a cat"\n[inputs]\nimage = "cat.jpg"\n'
ANIMATE = 'schema = 1\nkind = "animate"\n[inputs]\ncharacter = "hero.png"\nvideo = "dance.mp4"\n'
SHA = hashlib.sha256(b"image").hexdigest()


def parse(text: str, base: Path, library: Path | None = None, check: bool = False) -> Job:
    return parse_manifest_text(text, "job.toml", base, base, check_inputs=check, lora_library=library)


def errors(text: str, base: Path, library: Path | None = None, check: bool = False) -> list[tuple[str, str]]:
    with pytest.raises(ManifestInvalid) as caught:
        parse(text, base, library, check)
    return [(e.field, e.expected) for e in caught.value.errors]


# ---------------------------------------------------------------------------------------------- presets


def test_the_lightning_preset_sets_the_published_values(tmp_path: Path) -> None:
    s = parse(I2V + '[sampling]\npreset = "lightning-4step"\n', tmp_path).sampling
    assert (s.preset, s.steps, s.solver, s.timesteps, s.shift, s.guide_scale, s.boundary) == (
        "lightning-4step", 4, "euler", (1000, 750, 500, 250), 5.0, (1.0, 1.0), 0.9)
    a = parse(ANIMATE + '[sampling]\npreset = "lightning-4step"\n', tmp_path).sampling
    assert (a.preset, a.steps, a.solver, a.timesteps, a.shift, a.guide_scale, a.boundary) == (
        "lightning-4step", 4, "unipc", None, 5.0, 1.0, None)
    plain = parse(I2V, tmp_path).sampling
    assert (plain.preset, plain.steps, plain.solver) == (None, 40, "unipc")


def test_explicit_fields_override_the_preset(tmp_path: Path) -> None:
    s = parse(I2V + '[sampling]\npreset = "lightning-4step"\nshift = 3.0\nguide_scale = [1.0, 2.0]\nboundary = 0.85\n'
              "seed = 5\n", tmp_path).sampling
    assert (s.shift, s.guide_scale, s.boundary, s.seed, s.steps, s.timesteps) == (
        3.0, (1.0, 2.0), 0.85, 5, 4, (1000, 750, 500, 250))
    # the schedule goes as a whole: own steps, solver or timesteps replace the preset's, the kind's defaults the rest
    s = parse(I2V + '[sampling]\npreset = "lightning-4step"\nsteps = 8\n', tmp_path).sampling
    assert (s.steps, s.solver, s.timesteps, s.shift, s.guide_scale) == (8, "unipc", None, 5.0, (1.0, 1.0))
    s = parse(I2V + '[sampling]\npreset = "lightning-4step"\nsolver = "euler"\ntimesteps = [1000, 500]\n',
              tmp_path).sampling
    assert (s.steps, s.solver, s.timesteps, s.preset) == (2, "euler", (1000, 500), "lightning-4step")


def test_unknown_presets_are_errors(tmp_path: Path) -> None:
    assert errors(I2V + '[sampling]\npreset = "lightning-4stp"\n', tmp_path) == [
        ("sampling.preset", 'one of "lightning-4step"; did you mean "lightning-4step"?')]


# ---------------------------------------------------------------------------------------------- [[lora]]


def test_lora_entries_resolve_per_kind(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    library = tmp_path / "models" / "loras"
    (library / "sub").mkdir(parents=True)
    (library / "sub" / "high.safetensors").write_bytes(b"x")
    job = parse(I2V + '[[lora]]\nlibrary = "sub/high.safetensors"\nexpert = "high_noise"\nstrength = 1.5\n'
                      f'sha256 = "{SHA.upper()}"\n[[lora]]\npath = "loras/style.pt"\nsize = 12\n', tmp_path, library)
    first, second = job.loras
    assert (first.source, first.file, first.experts, first.strength, first.path, first.sha256) == (
        "library", "sub/high.safetensors", ("high_noise",), 1.5, library / "sub" / "high.safetensors", SHA)
    assert (second.source, second.experts, second.strength, second.path, second.size) == (
        "upload", ("high_noise", "low_noise"), 1.0, tmp_path.resolve() / "loras" / "style.pt", 12)
    assert list(job.files()) == ["image", "lora[1]"] and job.files()["lora[1]"].field == "lora[1].path"
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    (animate,) = parse(ANIMATE + '[[lora]]\npath = "a.safetensors"\n', tmp_path).loras
    assert animate.experts == ()  # Animate's one model


def test_wrong_lora_entries_name_field_value_and_reason(tmp_path: Path) -> None:
    text = I2V + ('[[lora]]\nlibrary = "a.safetensors"\npath = "b.safetensors"\n'
                  '[[lora]]\nlibrary = "/abs/a.safetensors"\nstrength = 9\nexpert = "middle"\nsha256 = "xyz"\n'
                  '[[lora]]\npath = "../up.safetensors"\nstrenght = 1\n'
                  '[[lora]]\npath = "notes.txt"\n'
                  '[[lora]]\nlibrary = "a.safetensors"\nsize = 3\n')
    found = dict(errors(text, tmp_path))
    assert "not both" in found["lora[0]"]
    assert "not an absolute path" in found["lora[1].library"]
    assert found["lora[1].strength"].startswith("a number from -5 to 5, not 0")
    assert found["lora[1].expert"].startswith('one of "high_noise", "low_noise", "both"')
    assert found["lora[1].sha256"].startswith("64 hexadecimal")
    assert 'without ".."' in found["lora[2].path"]
    assert found["lora[2].strenght"].startswith("a key of [[lora]] (library, path, strength, expert")
    assert found["lora[3].path"].startswith("a LoRA file (.safetensors, .ckpt, .pth, .pt, .bin)")
    assert "no size for a library file" in found["lora[4].size"]
    many = I2V + '[[lora]]\npath = "a.safetensors"\n' * 9
    assert errors(many, tmp_path) == [("lora", "at most 8 LoRAs per job")]
    top = I2V.replace("[inputs]", 'lora = "a.safetensors"\n[inputs]')
    assert errors(top, tmp_path)[0] == ("lora", errors(top, tmp_path)[0][1])
    assert "one [[lora]] table per LoRA" in errors(top, tmp_path)[0][1]
    ((field, expected),) = errors(I2V + "lora = 1\n", tmp_path)  # below [inputs] TOML puts it there: the hint says so
    assert field == "inputs.lora" and '"lora" is a top-level key: move it above the first [table] line' in expected
    assert errors(ANIMATE + '[[lora]]\npath = "a.safetensors"\nexpert = "high_noise"\n', tmp_path) == [
        ("lora[0].expert", 'no expert with kind = "animate": it has one model, which every LoRA of the job goes '
                           "on (leave expert out)")]


def test_error_lines_point_at_the_right_lora_table(tmp_path: Path) -> None:
    text = I2V + '[[lora]]\npath = "a.safetensors"\n\n[[lora]]\npath = "b.safetensors"\nstrength = 0\n'
    with pytest.raises(ManifestInvalid) as caught:
        parse(text, tmp_path)
    (error,) = caught.value.errors
    assert (error.field, error.line) == ("lora[1].strength", 11)


def test_library_names_are_confined_to_the_library(tmp_path: Path) -> None:
    library = tmp_path / "models" / "loras"
    library.mkdir(parents=True)
    (library / "ok.safetensors").write_bytes(b"x")
    (library / "folder.safetensors").mkdir()
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    os.symlink(outside, library / "escape.safetensors")
    os.symlink(library / "ok.safetensors", library / "alias.safetensors")  # a link that stays inside is fine
    assert parse(I2V + '[[lora]]\nlibrary = "alias.safetensors"\n', tmp_path, library).loras[0].file == "alias.safetensors"
    cases = {"../secret.safetensors": 'without ".."', "escape.safetensors": "outside it (symbolic link)",
             "missing.safetensors": "none of that name; it has alias.safetensors, escape.safetensors, ok.safetensors",
             "folder.safetensors": "is a folder or special file", ".hidden.safetensors": "hidden names",
             "C:/x.safetensors": "no backslashes, drive letters"}
    for name, reason in cases.items():
        ((field, expected),) = errors(I2V + f'[[lora]]\nlibrary = "{name}"\n', tmp_path, library)
        assert field == "lora[0].library" and reason in expected, (name, expected)
    # without a library (wanbox validate on a laptop) names are checked as text only
    assert parse(I2V + '[[lora]]\nlibrary = "missing.safetensors"\n', tmp_path).loras[0].path is None


def test_uploaded_loras_are_checked_on_disk_like_inputs(tmp_path: Path) -> None:
    (tmp_path / "real.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "real.safetensors", tmp_path / "link.safetensors")
    ((field, expected),) = errors(I2V + '[[lora]]\npath = "link.safetensors"\n', tmp_path, check=True)
    assert field == "lora[0].path" and "symbolic link" in expected


# ---------------------------------------------------------------------------------------------- the stored form, the hash


def test_jobs_stored_before_loras_existed_still_read(tmp_path: Path) -> None:
    job = parse(I2V, tmp_path)
    old = job.to_dict()
    del old["loras"]
    del old["sampling"]["preset"]
    assert Job.from_dict(json.loads(json.dumps(old))) == job


def test_the_hash_counts_lora_contents_strengths_and_experts_not_names(tmp_path: Path) -> None:
    def digest(text: str, *loras: str) -> str:
        return manifest_hash(text.encode(), {"image": SHA}, list(loras))

    a, b = "a" * 64, "b" * 64
    one = I2V + '[[lora]]\nlibrary = "x.safetensors"\n'
    base = digest(one, a)
    assert base != digest(I2V)  # a LoRA changes the video
    assert base == digest(I2V + '[[lora]]\npath = "elsewhere/renamed.safetensors"\n', a)  # where from: not
    assert len({base, digest(one, b), digest(one.replace('.safetensors"', '.safetensors"\nstrength = 0.5'), a),
                digest(one.replace('.safetensors"', '.safetensors"\nexpert = "low_noise"'), a)}) == 4
    assert digest(I2V + '[sampling]\npreset = "lightning-4step"\n') != digest(
        I2V + '[sampling]\nsteps = 4\nsolver = "euler"\ntimesteps = [1000, 750, 500, 250]\nshift = 5.0\n'
              "guide_scale = 1.0\n")  # the preset name is part of the job as recorded
    with pytest.raises(ValueError, match="expected 1, one per"):
        digest(one)


# ---------------------------------------------------------------------------------------------- JSON Schema, validate


@pytest.mark.parametrize(("text", "ok"), [
    (I2V + '[[lora]]\nlibrary = "a/b.safetensors"\nexpert = "high_noise"\nstrength = -1.5\n', True),
    (I2V + '[[lora]]\npath = "up.pt"\nsize = 3\nsha256 = "' + SHA + '"\n[sampling]\npreset = "lightning-4step"\n', True),
    (I2V + '[[lora]]\nlibrary = "a.safetensors"\npath = "b.safetensors"\n', False),
    (I2V + '[[lora]]\nstrength = 1.0\n', False),
    (I2V + '[[lora]]\nlibrary = "../a.safetensors"\n', False),
    (I2V + '[[lora]]\npath = "a.safetensors"\nstrength = 0\n', False),
    (I2V + '[[lora]]\npath = "a.safetensors"\nexpert = "both-ish"\n', False),
    (ANIMATE + '[[lora]]\npath = "a.safetensors"\nexpert = "high_noise"\n', False),
    (ANIMATE + '[[lora]]\npath = "a.safetensors"\n[sampling]\npreset = "lightning-4step"\n', True),
    (I2V + '[sampling]\npreset = "turbo"\n', False),
])
def test_the_json_schema_agrees_with_the_reader(text: str, ok: bool, tmp_path: Path) -> None:
    assert schema_accepts(json_schema(), tomllib.loads(text)) is ok
    if ok:
        parse(text, tmp_path)
    else:
        with pytest.raises(ManifestInvalid):
            parse(text, tmp_path)


def test_validate_prints_the_resolved_preset_and_checks_the_library(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "job.toml"
    manifest.write_text(I2V + '[sampling]\npreset = "lightning-4step"\nseed = 1\n')
    assert validate([str(manifest), "--no-check-inputs"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["sampling"]["steps"] == 4 and json.loads(out)["sampling"]["preset"] == "lightning-4step"
    assert "sampling.preset lightning-4step resolved to steps 4, solver euler, shift 5, guide_scale (1.0, 1.0), " \
           "timesteps [1000, 750, 500, 250], boundary 0.9" in err
    assert "lists no [[lora]]" in err and "wanbox models pull --lora lightning-i2v-A14B" in err
    manifest.write_text(I2V + '[[lora]]\nlibrary = "x.safetensors"\n')
    assert validate([str(manifest), "--no-check-inputs"]) == 0
    assert "checked as text only" in capsys.readouterr().err
    library = tmp_path / "lib"
    library.mkdir()
    assert validate([str(manifest), "--no-check-inputs", "--lora-library", str(library)]) == 2
    assert 'lora[0].library = "x.safetensors": expected a file in the LoRA library' in capsys.readouterr().err
