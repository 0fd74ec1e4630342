"""`tfbackend check`: static inspection, no weights, no GPU."""

from __future__ import annotations

import sys

import typer

from tfbackend.cli.app import app
from tfbackend.cli.errors import user_errors


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip().upper() for x in v.split(",") if x.strip())
    return out


@app.command()
def check(
    model: str = typer.Argument(..., help="Hub id (org/name), a local folder, or a config.json."),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size to check."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size to check."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hub token for gated or private repos."
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Use the local hub cache only (as HF_HUB_OFFLINE=1)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow running the repo's own modelling code."
    ),
    vllm_version: str | None = typer.Option(
        None,
        "--vllm-version",
        help="Check against this vLLM version or profile (default: installed, else newest).",
    ),
    select: list[str] | None = typer.Option(
        None, "--select", help="Only these rule ids or prefixes."
    ),
    ignore: list[str] | None = typer.Option(
        None, "--ignore", help="Skip these rule ids or prefixes."
    ),
    strict: bool = typer.Option(False, "--strict", help="Warnings fail the check too."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Served dtype (default: the config's; float32 → bfloat16 as vLLM)."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="KV cache context (default: the config's, capped at 131072)."
    ),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GiB of memory per GPU."),
    no_checkpoint: bool = typer.Option(
        False, "--no-checkpoint", help="Do not read the checkpoint's safetensors headers."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the JSON report only (schema in docs/json-schema.md)."
    ),
    json_file: str | None = typer.Option(
        None, "--json-file", help="Also write the JSON report to this file."
    ),
    junit: str | None = typer.Option(None, "--junit", help="Also write JUnit XML to this file."),
    markdown: str | None = typer.Option(
        None,
        "--markdown",
        help="Also write a Markdown summary to this file ($GITHUB_STEP_SUMMARY).",
    ),
    with_vllm: bool = typer.Option(
        False,
        "--with-vllm",
        help="Also build the model with the installed vLLM (CPU, meta, one gloo process per "
        "rank) and diff it against the plan.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Predict what vLLM's Transformers backend will build for MODEL, and whether it will work."""
    from tfbackend.check import CheckOptions
    from tfbackend.check import check as run_check

    with user_errors(debug, subject=f"checking {model}"):
        _refuse_overwriting_inputs(model, json_file, junit, markdown)
        report = run_check(
            model,
            CheckOptions(
                tp=tp,
                pp=pp,
                revision=revision,
                token=token,
                offline=offline or None,
                trust_remote_code=trust_remote_code,
                vllm_version=vllm_version,
                select=_split(select),
                ignore=_split(ignore),
                strict=strict,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory=gpu_memory,
                no_checkpoint=no_checkpoint,
                with_vllm=with_vllm,
            ),
        )
        _write_files(report, model, json_file, junit, markdown)
    if json_out:
        from tfbackend.report.json_out import to_json

        sys.stdout.write(to_json(report) + "\n")
    else:
        from tfbackend.report.console import make_console, render_check

        render_check(report, make_console())
    raise typer.Exit(report.exit_code)


def _refuse_overwriting_inputs(model: str, json_file, junit, markdown) -> None:
    """A report file may not land in the model's folder (its config, weights, tokenizer)."""
    from pathlib import Path

    from tfbackend.report.files import check_outputs

    outputs = {"--json-file": json_file, "--junit": junit, "--markdown": markdown}
    if not any(outputs.values()):
        return
    path = Path(model).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        check_outputs(
            outputs, files=[("the model's config", path)], folders=[("the model's folder", folder)]
        )
    else:  # a hub id: its files live in the hub cache
        from huggingface_hub import constants

        check_outputs(outputs, folders=[("the hub cache", constants.HF_HUB_CACHE)])


def _write_files(report, model: str, json_file, junit, markdown) -> None:
    from tfbackend.report.files import write_report_file

    if json_file:
        from tfbackend.report.json_out import to_json

        write_report_file(json_file, to_json(report) + "\n")
    if junit:
        from tfbackend.report.junit import check_junit

        write_report_file(junit, check_junit(report, model))
    if markdown:
        from tfbackend.report.markdown import check_markdown

        write_report_file(markdown, check_markdown(report, model))
