"""`tfbackend env`: the versions and hardware a bug report needs (like `vllm collect-env`)."""

from __future__ import annotations

import sys

import typer

from tfbackend.cli.app import app


@app.command()
def env(
    json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Print versions of Python, torch, transformers, vLLM, CUDA and the GPUs."""
    from tfbackend.env import collect

    info = collect()
    if json_out:
        from tfbackend.report.json_out import to_json

        sys.stdout.write(to_json(info) + "\n")
        return
    from tfbackend.report.console import make_console
    from tfbackend.report.env_console import render_env

    render_env(info, make_console())
