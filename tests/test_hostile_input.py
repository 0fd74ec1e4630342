"""Hostile and broken input to `check`, `gate` and the CLI itself (issue 13).

Each test reproduces one defect the issue lists (its number is in the test's docstring): no code
runs without consent, nothing unbounded, no silent pass, one line and exit 2 for bad input.
`run`'s share is in test_hostile_run.py (it spawns ranks).
"""

from __future__ import annotations

import json
import os
import resource
import struct
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


def cli(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def proc(*args, timeout: float = 180, memory_limit: int | None = None, **kw):
    """The real command in its own process: what a user (or CI) sees, exit code included."""

    def limit():  # a defect that reads without bound must fail here, not take the machine
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "tfbackend", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        preexec_fn=limit,
        **kw,
    )


def one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny.save(tiny.llama(), tmp_path / "m")


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return folder


# -- 1. no code runs without consent ------------------------------------------------------------


def _plant(folder: Path, marker: Path, module: str = "evil") -> None:
    """A module that, if imported, leaves a marker: proof that the repo's code ran."""
    (folder / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from transformers import LlamaConfig\n"
        "class MyConfig(LlamaConfig):\n"
        "    model_type = 'my_llama'\n"
    )


def _custom_config_model(root: Path, marker: Path) -> Path:
    folder = tiny.save(tiny.llama(), root / "custom")
    _edit_config(folder, model_type="my_llama", auto_map={"AutoConfig": "evil.MyConfig"})
    _plant(folder, marker)
    return folder


def test_gate_has_trust_remote_code_and_never_runs_code_without_it(tmp_path):
    """1: `gate` had no --trust-remote-code at all, nor a manifest key for it."""
    marker = tmp_path / "imported"
    _custom_config_model(tmp_path, marker)
    (tmp_path / "m.toml").write_text('[[models]]\nid = "custom"\nexpected = "fail"\n')
    refused = cli("gate", tmp_path / "m.toml", "--no-progress")
    assert not marker.exists()
    assert "--trust-remote-code" in refused.output  # the check error says what to pass

    trusted = cli("gate", tmp_path / "m.toml", "--no-progress", "--trust-remote-code")
    assert "no such option" not in trusted.output.lower(), trusted.output
    assert marker.exists()  # consent given: the repo's config code is what vLLM would run


def test_the_manifest_grants_trust_per_model(tmp_path):
    """1: a per-model `trust_remote_code` key; models without it stay untrusted."""
    marker = tmp_path / "imported"
    _custom_config_model(tmp_path, marker)
    (tmp_path / "m.toml").write_text(
        '[[models]]\nid = "custom"\nexpected = "fail"\ntrust_remote_code = true\n'
    )
    result = cli("gate", tmp_path / "m.toml", "--no-progress")
    assert "unknown key" not in result.output, result.output
    assert marker.exists()

    from tfbackend.gate.manifest import load_manifest

    (tmp_path / "n.toml").write_text(
        '[[models]]\nid = "custom"\nexpected = "fail"\n'
        '[[models]]\nid = "custom"\nrevision = "x"\nexpected = "fail"\ntrust_remote_code = true\n'
    )
    plain, trusted = load_manifest(tmp_path / "n.toml").models
    assert (plain.trust_remote_code, trusted.trust_remote_code) == (False, True)
    (tmp_path / "bad.toml").write_text(
        '[[models]]\nid = "custom"\nexpected = "fail"\ntrust_remote_code = "yes"\n'
    )
    bad = cli("gate", tmp_path / "bad.toml", "--no-progress")
    assert bad.exit_code == 2 and "trust_remote_code" in one_error_line(bad.output)


# -- 3. parallel sizes are bounded --------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--tp", "8192"], ["--pp", "5000"], ["--tp", "64", "--pp", "128"]]
)
def test_parallel_sizes_past_the_world_bound_are_refused(args):
    """3: `--tp 99999999999999999999` built a list of every rank until the kernel killed it."""
    result = cli("check", EXAMPLE, *args)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "4096" in line


def test_manifest_parallel_sizes_are_bounded(tmp_path):
    """3: the manifest's tp/pp too."""
    (tmp_path / "m.toml").write_text(
        f'[[models]]\nid = "{EXAMPLE}"\ntp = [1, 8192]\nexpected = "pass"\n'
    )
    result = cli("gate", tmp_path / "m.toml", "--no-progress")
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "4096" in line and "m.toml:3" in line and "'tp'" in line


# -- 4. layer count is bounded ------------------------------------------------------------------


def test_a_config_past_the_layer_bound_is_refused_at_once(model):
    """4: `num_hidden_layers: 100000` ran for minutes and took gigabytes before any output."""
    _edit_config(model, num_hidden_layers=1025)
    result = cli("check", model)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "num_hidden_layers" in line and "1025" in line and "1024" in line
    assert "config.json" in line


def test_a_hundred_thousand_layers_answer_in_seconds(model):
    """4: the issue's own config, end to end in a process (before: minutes, gigabytes)."""
    _edit_config(model, num_hidden_layers=100_000)
    p = proc("check", model, timeout=150, memory_limit=4 << 30)
    assert p.returncode == 2, p.stderr
    assert "1024" in one_error_line(p.stderr)


# -- 5. only regular files, with a size bound ---------------------------------------------------


def test_a_fifo_config_does_not_block(tmp_path):
    """5: a config.json path that is a FIFO blocked forever."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    p = proc("check", fifo, timeout=60)
    assert p.returncode == 2
    assert "not a regular file" in one_error_line(p.stderr)


def test_a_config_linked_to_dev_zero_does_not_fill_memory(tmp_path):
    """5: a symlink to /dev/zero filled memory (here: a 2 GiB address-space limit)."""
    (tmp_path / "config.json").symlink_to("/dev/zero")
    p = proc("check", tmp_path / "config.json", timeout=120, memory_limit=2 << 30)
    assert p.returncode == 2
    assert "not a regular file" in one_error_line(p.stderr)


def test_an_oversized_config_is_refused_by_its_size(tmp_path):
    """5: a regular file past the size bound is refused before it is read."""
    path = tmp_path / "config.json"
    with path.open("wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MiB of nothing
    result = cli("check", path)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "MiB" in line and "config.json" in line


def test_a_fifo_safetensors_file_does_not_block(model):
    """5: a FIFO named *.safetensors next to the config blocked the header read."""
    os.mkfifo(model / "model.safetensors")
    p = proc("check", model, timeout=60)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert "model.safetensors" in line and "not a regular file" in line


def test_a_fifo_shard_index_does_not_block(model):
    """5: the safetensors index is read only when it is a regular file."""
    os.mkfifo(model / "model.safetensors.index.json")
    p = proc("check", model, timeout=60)
    assert p.returncode == 2
    assert "model.safetensors.index.json" in one_error_line(p.stderr)


@pytest.mark.parametrize("which", ["manifest", "baseline"])
def test_gate_files_that_are_fifos_do_not_block(tmp_path, which):
    """5: the manifest and the baseline are user files too."""
    manifest = tmp_path / "m.toml"
    baseline = tmp_path / "base.json"
    if which == "manifest":
        os.mkfifo(manifest)
    else:
        manifest.write_text(f'[[models]]\nid = "{EXAMPLE}"\nexpected = "pass"\n')
        os.mkfifo(baseline)
    p = proc("gate", manifest, "--no-progress", "--baseline", baseline, timeout=60)
    assert p.returncode == 2
    assert "not a regular file" in one_error_line(p.stderr)


# -- 8. reports never overwrite an input; written atomically ------------------------------------


@pytest.mark.parametrize("flag", ["--json-file", "--junit", "--markdown"])
def test_check_refuses_to_write_a_report_over_the_model(model, flag):
    """8: `--json-file MODEL/config.json` overwrote the model's own config and exited 0."""
    config = model / "config.json"
    before = config.read_bytes()
    result = cli("check", model, flag, config)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert flag in line and "config.json" in line
    assert config.read_bytes() == before
    # any file of the model folder is an input (weights, tokenizer, the index)
    result = cli("check", model, flag, model / "tokenizer.json")
    assert result.exit_code == 2 and not (model / "tokenizer.json").exists()


def test_gate_refuses_to_write_a_report_over_its_manifest_or_baseline(tmp_path):
    """8: the same for the gate's manifest and baseline."""
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[[models]]\nid = "{EXAMPLE}"\nexpected = "pass"\n')
    text = manifest.read_text()
    result = cli("gate", manifest, "--no-progress", "--junit", manifest)
    assert result.exit_code == 2 and "--junit" in one_error_line(result.output)
    assert manifest.read_text() == text

    base = tmp_path / "base.json"
    assert cli("gate", manifest, "--no-progress", "--json", base).exit_code == 0
    saved = base.read_text()
    result = cli("gate", manifest, "--no-progress", "--baseline", base, "--markdown", base)
    assert result.exit_code == 2 and "--markdown" in one_error_line(result.output)
    assert base.read_text() == saved


def test_reports_are_written_atomically(model, tmp_path):
    """8: a report replaces its file in one step (a new inode through os.replace), so a reader
    or an interrupted write never sees half a report; no temporary file is left behind."""
    out = tmp_path / "out"
    out.mkdir()
    report = out / "r.json"
    report.write_text("old\n")
    inode = report.stat().st_ino
    result = cli("check", model, "--json-file", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["verdict"] == "PASS"
    assert report.stat().st_ino != inode
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]


# -- 9. unknown rule ids are bad input ----------------------------------------------------------


@pytest.mark.parametrize("flag", ["--select", "--ignore"])
def test_unknown_rule_ids_are_bad_input(tmp_path, flag):
    """9: `--select TFB999` ran zero rules, so a failing model passed with exit 0."""
    failing = tiny.save(tiny.llama(quantization_config={"quant_method": "mxfp4"}), tmp_path / "q")
    result = cli("check", failing, flag, "TFB601,TFB999")
    assert result.exit_code == 2
    assert "TFB999" in one_error_line(result.output)


def test_rule_prefixes_stay_valid(tmp_path):
    """9: a prefix (TFB6 = every quantization rule) is still a selection."""
    failing = tiny.save(tiny.llama(quantization_config={"quant_method": "mxfp4"}), tmp_path / "q")
    result = cli("check", failing, "--select", "TFB6", "--json")
    assert result.exit_code == 1
    assert {f["rule_id"] for f in json.loads(result.stdout)["findings"]} == {"TFB601"}


def test_unknown_rule_ids_in_the_manifest_are_bad_input(tmp_path):
    """9: the manifest's `ignore` too, with the file and line."""
    (tmp_path / "m.toml").write_text(
        f'[[models]]\nid = "{EXAMPLE}"\nexpected = "pass"\nignore = ["TFB2", "TFB299"]\n'
    )
    result = cli("gate", tmp_path / "m.toml", "--no-progress")
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "TFB299" in line and "m.toml:4" in line


# -- 10. a dtype the safetensors library refuses ------------------------------------------------


def _write_safetensors_header(path: Path, header: dict, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)


def test_a_safetensors_dtype_the_library_refuses_does_not_pass(tmp_path):
    """10: a header whose dtype safetensors cannot read passed `check` with exit 0."""
    folder = tiny.save(tiny.llama(num_hidden_layers=1), tmp_path / "m")
    from safetensors import safe_open

    header = {"model.embed_tokens.weight": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}
    _write_safetensors_header(folder / "model.safetensors", header, 8)
    with pytest.raises(Exception, match="F33"):  # the library itself refuses the file
        safe_open(str(folder / "model.safetensors"), "np")
    result = cli("check", folder)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "model.safetensors" in line and "F33" in line


def test_a_tensor_whose_bytes_do_not_match_its_shape_does_not_pass(tmp_path):
    """10: the library also refuses a tensor whose data_offsets do not span shape × dtype."""
    folder = tiny.save(tiny.llama(num_hidden_layers=1), tmp_path / "m")
    header = {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 8]}}
    _write_safetensors_header(folder / "model.safetensors", header, 8)
    result = cli("check", folder)
    assert result.exit_code == 2
    assert "model.norm.weight" in one_error_line(result.output)


# -- 11. quantization without a method vLLM knows -----------------------------------------------


@pytest.mark.parametrize("q", [{"bits": 4}, {"quant_method": "hqq"}])
def test_missing_or_unknown_quant_method_is_an_error(tmp_path, q):
    """11: a missing or unknown quant_method was only a warning (exit 0)."""
    folder = tiny.save(tiny.llama(quantization_config=q), tmp_path / "q")
    result = cli("check", folder, "--json")
    assert result.exit_code == 1, result.output
    found = [f for f in json.loads(result.stdout)["findings"] if f["rule_id"] == "TFB602"]
    assert [f["severity"] for f in found] == ["error"]


# -- 12. --debug adds a traceback and changes nothing else --------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_keeps_exit_2_for_bad_input(how):
    """12: with --debug (or TFBACKEND_DEBUG=1) bad input exited 1 instead of 2."""
    args = ["check", "./no/such/model"] + (["--debug"] if how == "flag" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if how == "env":
        env["TFBACKEND_DEBUG"] = "1"
    p = subprocess.run(
        [sys.executable, "-m", "tfbackend", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 2
    assert "Traceback" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: no such file or folder")


# -- 13. numeric options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--gpu-memory", "nan"], "--gpu-memory"),
        (["--gpu-memory", "inf"], "--gpu-memory"),
        (["--gpu-memory", "-1"], "--gpu-memory"),
        (["--max-model-len", "0"], "--max-model-len"),
    ],
)
def test_check_numeric_options_are_validated(args, flag):
    """13/15: `--gpu-memory nan` ended in "unexpected ValueError: cannot convert float NaN"."""
    result = cli("check", EXAMPLE, *args)
    assert result.exit_code == 2
    assert flag in one_error_line(result.output)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_gate_tolerance_is_validated(tmp_path, value):
    """13: `gate --tolerance nan` compared every metric with nan."""
    (tmp_path / "m.toml").write_text(f'[[models]]\nid = "{EXAMPLE}"\nexpected = "pass"\n')
    result = cli("gate", tmp_path / "m.toml", "--no-progress", "--tolerance", value)
    assert result.exit_code == 2
    assert "--tolerance" in one_error_line(result.output)


# -- 14/15. errors name the field, the value, the reason and the file ---------------------------


def test_config_validation_errors_give_field_value_reason_and_file(model):
    """14: strict dataclass validation kept only "Validation error for field 'hidden_size':"."""
    _edit_config(model, hidden_size="abc")
    result = cli("check", model)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "hidden_size" in line and "'abc'" in line and "expected int" in line
    assert str(model / "config.json") in line


def test_config_class_validation_errors_give_the_reason_and_file(model):
    """14: a class validator's message (several fields) is kept too."""
    _edit_config(model, hidden_size=65)
    line = one_error_line(cli("check", model).output)
    assert "not a multiple" in line and "(65)" in line and str(model / "config.json") in line


def test_a_non_utf8_config_names_the_file(model):
    """15: a non-UTF-8 config was "unexpected UnicodeDecodeError"."""
    path = model / "config.json"
    path.write_bytes(path.read_bytes().replace(b'"llama"', b'"ll\xffama"'))
    result = cli("check", model)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "unexpected" not in line and str(path) in line and "UTF-8" in line


@pytest.mark.parametrize("field", ["num_attention_heads", "num_key_value_heads", "vocab_size"])
def test_a_zero_dimension_names_the_field_and_file(model, field):
    """15: `num_attention_heads: 0` was "unexpected ZeroDivisionError: integer modulo by zero"."""
    _edit_config(model, **{field: 0})
    result = cli("check", model)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "unexpected" not in line and field in line and "config.json" in line


@pytest.mark.parametrize(
    "index", [{"weight_map": ["a", "b"]}, {"weight_map": {"x": 3}}, {"weight_map": {"x": "../x"}}]
)
def test_a_broken_shard_index_names_the_file(model, index):
    """15: a broken index (weight_map not a name → file map) was "unexpected AttributeError"."""
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("check", model)
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "unexpected" not in line and "model.safetensors.index.json" in line


# -- 16. usage errors: one line, what to do -----------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["check", "--tpp", "2", "x"], "no such option: --tpp"),
        (["check"], "missing argument"),
        (["check", "x", "--tp", "two"], "'--tp'"),
        (["gate", "m.toml", "--tolerance"], "--tolerance"),
        (["nosuchcommand"], "no such command"),
    ],
)
def test_usage_errors_are_one_line(args, words):
    """16: usage errors printed four lines (Usage, Try, blank, Error)."""
    p = proc(*args, timeout=60)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert words in line.lower()
    assert "--help" in line  # says where the options are
    assert p.stdout == ""


def test_usage_errors_are_one_line_in_process_too():
    """16: the same through typer's CliRunner (the app object itself)."""
    result = cli("check", "--tpp", "2", "x")
    assert result.exit_code == 2
    assert one_error_line(result.output) == (
        "error: no such option: --tpp (Possible options: --dtype, --pp, --tp); "
        "see 'tfbackend check --help'"
    )


def test_help_still_works():
    """16: --help prints help and exits 0; no arguments prints the help too."""
    p = proc("check", "--help", timeout=60)
    assert p.returncode == 0 and "--tp" in p.stdout and "Usage" in p.stdout
    bare = proc(timeout=60)
    assert "check" in bare.stdout + bare.stderr and "Usage" in bare.stdout + bare.stderr
    assert proc("--version", timeout=60).stdout.startswith("tfbackend ")


# -- output a CI log can read -------------------------------------------------------------------


def test_check_tables_print_every_number_in_full_without_a_terminal(tmp_path):
    """CI logs: rich cut tables to 80 columns, so the memory table printed `weigh…` and `301,…`."""
    folder = tiny.save(tiny.llama(), tmp_path / "m")
    data = json.loads(cli("check", folder, "--tp", "2", "--pp", "2", "--json").stdout)
    result = cli("check", folder, "--tp", "2", "--pp", "2", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "…" not in out
    from tfbackend.units import size

    for header in ("weights", "largest", "KV/token", "KV@len", "tokens fit", "heads/rank"):
        assert header in out
    for stage in data["sections"]["memory"]["stages"]:
        for key in ("weight_bytes", "kv_bytes_per_token", "total_bytes"):
            assert size(stage[key]) in out
        assert f"{stage['max_kv_tokens']:,}" in out


def _plain_console():
    """What CI gets: not a terminal, 80 columns (make_console's settings, into a buffer)."""
    import io

    from rich.console import Console

    return Console(
        file=io.StringIO(), width=80, force_terminal=False, highlight=False, soft_wrap=False
    )


def test_run_tables_print_every_number_in_full_without_a_terminal():
    """CI logs: the parity table printed `2.98e…` for every number."""
    import torch

    from tfbackend.parity.metrics import compare_logits
    from tfbackend.parity.result import RunReport
    from tfbackend.parity.workers import RankStats
    from tfbackend.report.run_console import render_run

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(7, 300, generator=gen)
    test = ref + 1e-5 * torch.randn(7, 300, generator=gen)
    metrics = [compare_logits(f"prompt-{i}", ref, test) for i in range(3)]
    report = RunReport(
        model="examples/models/tiny-llama", engine="native", tp=2, pp=2, device="cpu",
        dtype="float32", reference_dtype="float32", profile="vllm-0.11", prompts=metrics,
        ranks=[
            RankStats(rank=r, stage=r // 2, tp_rank=r % 2,
                      phases={"init": 1.234, "build": 0.5, "load": 2.25, "forward": 0.125},
                      shard_bytes=123_456_789, bytes_read=98_765_432, peak_bytes=3_456_789_012)
            for r in range(4)
        ],
    )  # fmt: skip
    console = _plain_console()
    render_run(report, console)
    out = console.file.getvalue()
    assert "…" not in out
    for m in metrics:
        for value in (m.kl_mean, m.kl_max, m.max_dlogprob_topk, m.max_dlogit):
            assert format(value, ".2e") in out
    for header in ("max |Δlogprob| top-k", "max |Δlogit|", "forward", "KL mean"):
        assert header in out


def test_gate_table_prints_long_names_in_full_without_a_terminal(tmp_path):
    """CI logs: the gate table cut model names and layouts."""
    from tfbackend.gate.manifest import load_manifest
    from tfbackend.gate.runner import GateOptions, run_gate
    from tfbackend.report.gate_console import render_gate

    name = "a-folder-with-a-rather-long-name/and-a-model-whose-name-is-long-too-v2"
    tiny.save(tiny.llama(), tmp_path / name)
    (tmp_path / "m.toml").write_text(
        f'[[models]]\nid = "{name}"\ntp = [1, 2]\npp = [1, 2]\nexpected = "pass"\n'
    )
    report = run_gate(load_manifest(tmp_path / "m.toml"), GateOptions(progress=False))
    console = _plain_console()
    render_gate(report, console)
    out = console.file.getvalue()
    assert "…" not in out
    assert name in out
    assert "tp=1 pp=1, tp=1 pp=2, tp=2 pp=1, tp=2 pp=2" in out
