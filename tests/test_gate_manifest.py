"""The gate manifest: what it accepts, and how it names what is wrong (key, entry, line; exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tfbackend.cli.app import app
from tfbackend.gate.manifest import ManifestError, load_manifest
from tfbackend.rules.findings import Verdict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return str(info.value)


def test_a_full_entry_loads_into_a_model_entry(tmp_path):
    (tmp_path / "tiny").mkdir()
    path = write(
        tmp_path,
        """
[defaults]
ignore = ["TFB205"]

[[models]]
id = "tiny"
tp = [1, 2, 2]
pp = 2
run = true
gpus = 4
expected = "pass-with-warnings"
vllm_version = "0.32"

[[models]]
id = "org/name"
revision = "v1"
ignore = "tfb1"
strict = true
expected = "fail"
""",
    )
    first, second = load_manifest(path).models
    assert first.source == str((tmp_path / "tiny").resolve())  # relative to the manifest
    assert first.tp == (1, 2) and first.pp == (2,)
    assert first.layouts == [(1, 2), (2, 2)]
    assert first.run and first.run_gpus == 4
    assert first.ignore == ("TFB205",)
    assert first.expected is Verdict.PASS_WITH_WARNINGS
    assert second.source == "org/name"  # not a path here: a hub id
    assert second.name == "org/name@v1"
    assert second.tp == (1,) and second.ignore == ("TFB1",) and second.strict


def test_unknown_key_is_named_with_its_line_and_entry(tmp_path):
    path = write(
        tmp_path,
        '[[models]]\nid = "a"\nexpected = "pass"\n\n[[models]]\nid = "b"\ntps = [2]\nexpected = "pass"\n',
    )
    message = error_of(path)
    assert f"{path}:7:" in message
    assert "models[2] (id 'b')" in message
    assert "unknown key 'tps'" in message


def test_missing_id_is_named(tmp_path):
    message = error_of(write(tmp_path, '[[models]]\nexpected = "pass"\n'))
    assert "models[1]" in message and "missing required key 'id'" in message


def test_missing_expected_is_named(tmp_path):
    message = error_of(write(tmp_path, '[[models]]\nid = "a"\n'))
    assert "(id 'a')" in message and "missing required key 'expected'" in message


@pytest.mark.parametrize("value", ["0", "-2", '"2"', "1.5", "true", "[]", "[1, 0]"])
def test_bad_tp_values_are_rejected(tmp_path, value):
    path = write(tmp_path, f'[[models]]\nid = "a"\nexpected = "pass"\ntp = {value}\n')
    message = error_of(path)
    assert f"{path}:4:" in message
    assert "key 'tp': must be a positive integer or a list of them" in message


def test_bad_pp_in_defaults_is_reported_on_the_model_that_uses_it(tmp_path):
    message = error_of(
        write(tmp_path, '[defaults]\npp = 0\n\n[[models]]\nid = "a"\nexpected = "pass"\n')
    )
    assert "(id 'a')" in message and "key 'pp'" in message


@pytest.mark.parametrize(
    "extra, words",
    [
        ('expected = "ok"', "key 'expected': must be one of pass, pass-with-warnings, fail"),
        ('expected = "pass"\nignore = ["E501"]', "key 'ignore'"),
        ('expected = "pass"\nrun = "yes"', "key 'run': must be true or false"),
        ('expected = "pass"\ntp = 4\ngpus = 2', "key 'gpus': 2 is fewer than"),
    ],
)
def test_bad_values_name_their_key(tmp_path, extra, words):
    assert words in error_of(write(tmp_path, f'[[models]]\nid = "a"\n{extra}\n'))


def test_structure_errors(tmp_path):
    assert "no models" in error_of(write(tmp_path, "[defaults]\ntp = 1\n"))
    assert "unknown top-level key 'model'" in error_of(write(tmp_path, '[[model]]\nid = "a"\n'))
    assert "invalid TOML" in error_of(write(tmp_path, "[[models]\n"))
    dup = '[[models]]\nid = "a"\nexpected = "pass"\n' * 2
    assert "duplicate model 'a'" in error_of(write(tmp_path, dup))
    assert "must be a .toml" in error_of(write(tmp_path, "x", name="models.json"))


def test_yaml_manifest_loads_and_names_lines(tmp_path):
    good = write(tmp_path, "models:\n  - id: org/a\n    tp: [1, 2]\n    expected: pass\n", "m.yaml")
    assert load_manifest(good).models[0].tp == (1, 2)
    bad = write(tmp_path, "models:\n  - id: org/a\n    expected: pass\n    tp: 0\n", "bad.yml")
    message = error_of(bad)
    assert f"{bad}:4:" in message and "key 'tp'" in message


def test_yaml_without_pyyaml_says_to_install_it_or_use_toml(tmp_path):
    path = write(tmp_path, "models: []\n", "m.yaml")
    code = (
        "import sys; sys.modules['yaml'] = None\n"  # as if PyYAML were not installed
        "from tfbackend.gate.manifest import load_manifest, ManifestError\n"
        f"try:\n    load_manifest({str(path)!r})\nexcept ManifestError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "needs PyYAML (pip install pyyaml)" in out.stdout
    assert "write the manifest as TOML" in out.stdout


def test_gate_cli_exits_2_on_a_bad_manifest_with_one_line(tmp_path):
    path = write(tmp_path, '[[models]]\nid = "a"\nexpected = "pass"\ntp = 0\n')
    result = CliRunner().invoke(app, ["gate", str(path), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {path}:4: models[1] (id 'a') key 'tp'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_only_keeps_the_named_models_and_rejects_unknown_names(tmp_path):
    from tfbackend.gate.manifest import select_models

    text = (
        '[[models]]\nid = "org/a"\nexpected = "pass"\n[[models]]\nid = "org/b"\nrevision = "v2"\n'
    )
    loaded = load_manifest(write(tmp_path, text + 'expected = "fail"\n'))
    assert [m.name for m in select_models(loaded, ["org/b@v2"]).models] == ["org/b@v2"]
    assert [m.name for m in select_models(loaded, ["org/b"]).models] == ["org/b@v2"]  # by id too
    with pytest.raises(ManifestError, match="no model named 'org/c'"):
        select_models(loaded, ["org/c"])


def test_changed_models_script_names_new_edited_and_touched_models(tmp_path):
    """examples/github-actions/changed_models.py, on a real git history."""
    script = ROOT / "examples" / "github-actions" / "changed_models.py"
    (tmp_path / "models" / "local").mkdir(parents=True)
    (tmp_path / "models" / "local" / "config.json").write_text("{}")
    entries = {
        "a": '[[models]]\nid = "org/a"\nexpected = "pass"\n',
        "b": '[[models]]\nid = "org/b"\nexpected = "pass"\n',
        "local": '[[models]]\nid = "models/local"\nexpected = "pass"\n',
    }
    (tmp_path / "models.toml").write_text("".join(entries.values()))

    def sh(*args):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )

    sh("git", "init", "-q", "-b", "main")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    entries["b"] = entries["b"].replace('"pass"', '"fail"') + "# comment only changes nothing\n"
    entries["new"] = '[[models]]\nid = "org/new"\nexpected = "pass"\n'
    (tmp_path / "models.toml").write_text("".join(entries.values()))
    (tmp_path / "models" / "local" / "config.json").write_text('{"x": 1}')
    sh("git", "commit", "-qam", "change")
    out = sh(sys.executable, str(script), "HEAD~1", "models.toml").stdout.split()
    assert out == ["org/b", "models/local", "org/new"]
