"""`tfbackend check` as a user runs it: exit codes, one-line errors, JSON on stdout only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import tiny
from tfbackend.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "models" / "tiny-llama"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_shipped_example_passes_offline():
    result = run("check", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.output
    assert "ColumnParallelLinear" in result.output or "QKVParallelLinear" in result.output


def test_json_is_the_only_thing_on_stdout(tmp_path):
    result = run("check", EXAMPLE, "--tp", "2", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema_version"] and data["verdict"] == "PASS"
    assert data["parallel"] == {"tp": 2, "pp": 1}
    assert data["model"]["model_type"] == "llama"
    assert any(e["target"] == "VocabParallelEmbedding" for e in data["plan"]["entries"])


def test_json_says_which_transformers_the_plan_was_read_from():
    import transformers
    from packaging.version import Version

    data = json.loads(run("check", EXAMPLE, "--json").stdout)
    assert data["read_with"]["transformers"] == transformers.__version__
    assert data["read_with"]["serving_range"] == ">=5.16.1,<5.20.0"
    inside = data["read_with"]["in_range"]
    assert inside == (Version(transformers.__version__) < Version("5.20"))
    assert any(f["rule_id"] == "TFB804" for f in data["findings"]) == (not inside)
    assert set(data["versions"]) >= {"transformers", "vllm", "vllm_distribution"}


def test_config_json_path_is_accepted():
    assert run("check", EXAMPLE / "config.json").exit_code == 0


def test_model_failing_a_rule_exits_1(tmp_path):
    folder = tiny.save(tiny.llama(quantization_config={"quant_method": "mxfp4"}), tmp_path / "q")
    result = run("check", folder)
    assert result.exit_code == 1
    assert "TFB601" in result.output and "FAIL" in result.output


def test_indivisible_heads_fail_at_tp_3(tmp_path):
    folder = tiny.save(tiny.llama(), tmp_path / "m")
    result = run("check", folder, "--tp", "3", "--json")
    assert result.exit_code == 1
    ids = {f["rule_id"] for f in json.loads(result.stdout)["findings"]}
    assert {"TFB203"} <= ids


def test_divisible_tp_passes(tmp_path):
    folder = tiny.save(tiny.llama(), tmp_path / "m")
    assert run("check", folder, "--tp", "2").exit_code == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["./no/such/model"], "no such file"),
        (["--tp", "0"], "--tp must be"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words):
    model = args[0] if not args[0].startswith("--") else str(EXAMPLE)
    rest = args[1:] if not args[0].startswith("--") else args
    result = run("check", model, *rest)
    assert result.exit_code == 2
    assert words in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_malformed_config_is_exit_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    result = run("check", tmp_path)
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_unknown_model_type_is_exit_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    result = run("check", tmp_path)
    assert result.exit_code == 2 and "unknown model_type" in result.output


def test_unknown_repo_offline_is_exit_2():
    result = run("check", "no-such-org/no-such-model-xyz")
    assert result.exit_code == 2
    assert "cache" in result.output or "not found" in result.output


def test_custom_code_without_trust_is_refused_for_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "my_model", "auto_map": {"AutoConfig": "cfg.MyConfig"}})
    )
    (tmp_path / "cfg.py").write_text("raise SystemExit('custom code must never run')\n")
    result = run("check", tmp_path)
    assert result.exit_code == 2 and "--trust-remote-code" in result.output


def test_custom_code_of_a_known_model_type_is_not_run_and_is_reported(tmp_path):
    folder = tiny.save(tiny.llama(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text("raise SystemExit('custom code must never run')\n")
    result = run("check", folder, "--json")
    assert result.exit_code == 0
    ids = {f["rule_id"] for f in json.loads(result.stdout)["findings"]}
    assert "TFB101" in ids


def test_hub_id_resolves_from_the_offline_cache(tmp_path):
    # A real hub cache layout, as huggingface_hub writes it.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    tiny.llama().save_pretrained(snap)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tfbackend", "check", "acme/tiny", "--tp", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["source_kind"] == "hub" and data["model"]["source"] == "acme/tiny"


def test_installed_console_script_runs():
    exe = Path(sys.executable).parent / "tfbackend"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tfbackend"]
    proc = subprocess.run(
        [*cmd, "check", str(EXAMPLE), "--tp", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict: PASS" in proc.stdout
    assert "\x1b[" not in proc.stdout  # no colour codes when not a TTY


def test_help_and_version():
    assert run("--version").output.startswith("tfbackend ")
    assert "check" in run("--help").output


@pytest.mark.parametrize("model_type", ["falcon_h1", "mamba2"])
def test_a_config_saved_with_infinity_reads_as_transformers_reads_it(tmp_path, model_type):
    # transformers writes float("inf") as {"__float__": "Infinity"} (time_step_limit)
    from tfbackend.parity.tiny import tiny_config

    config = tiny_config(model_type)
    config.save_pretrained(tmp_path)
    assert '"__float__"' in (tmp_path / "config.json").read_text()
    result = run("check", tmp_path, "--no-checkpoint")
    assert result.exit_code in (0, 1), result.output
