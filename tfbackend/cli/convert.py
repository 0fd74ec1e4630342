"""`tfbackend convert`: the per-rank checkpoint vLLM loads with load_format="sharded_state"."""

from __future__ import annotations

import sys

import typer

from tfbackend.cli.app import app
from tfbackend.cli.errors import user_errors


@app.command()
def convert(
    model: str = typer.Argument(
        ..., help="A local folder with config.json and safetensors, or a hub id."
    ),
    out: str = typer.Option(..., "--out", help="Folder to write (created; must be empty)."),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size the files are cut for."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size the files are cut for."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Weights dtype (default: the config's; float32 → bfloat16 as vLLM)."
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest file per rank, e.g. 5GB, 500MB, 2GiB."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hub token for gated or private repos."
    ),
    offline: bool = typer.Option(False, "--offline", help="Use the local hub cache only."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the repo's own modelling code."
    ),
    vllm_version: str | None = typer.Option(
        None, "--vllm-version", help="vLLM version or profile to convert for (0.32 or newer)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest (or refusal) as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Write the per-rank safetensors vLLM's ShardedStateLoader reads, from the plan, on a CPU."""
    from tfbackend.convert import ConvertOptions
    from tfbackend.convert import convert as run_convert
    from tfbackend.report.console import make_console
    from tfbackend.report.convert_console import convert_progress, render_convert, render_findings

    options = ConvertOptions(
        out=out,
        tp=tp,
        pp=pp,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        revision=revision,
        token=token,
        offline=offline or None,
        trust_remote_code=trust_remote_code,
        vllm_version=vllm_version,
    )
    with user_errors(debug), convert_progress() as progress:
        result = run_convert(model, options, progress)
    err = make_console(stderr=True)
    render_findings(result, err)
    if json_out:
        import json

        from tfbackend.report.convert_json import convert_json

        sys.stdout.write(json.dumps(convert_json(result), indent=2) + "\n")
    else:
        render_convert(result, make_console())
    raise typer.Exit(result.exit_code)
