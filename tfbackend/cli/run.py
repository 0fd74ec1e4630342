"""`tfbackend run`: the wrapped model on real devices, logits compared with plain transformers."""

from __future__ import annotations

import contextlib
import sys

import typer

from tfbackend.cli.app import app
from tfbackend.cli.errors import user_errors


@app.command()
def run(
    model: str = typer.Argument(
        ...,
        help="A local folder with config.json and safetensors, a hub id, or a folder "
        "`tfbackend convert` wrote.",
    ),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size (ranks per stage)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline parallel size (stages)."),
    device: str = typer.Option(
        "cuda", "--device", help="cuda (NCCL, one GPU per rank) or cpu (gloo)."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or float16."),
    reference_dtype: str | None = typer.Option(
        None, "--reference-dtype", help="Reference dtype (default: --dtype), e.g. float32."
    ),
    prompts: str | None = typer.Option(
        None,
        "--prompts",
        help="A text file (one prompt per line) or a JSON list of strings or token-id lists.",
    ),
    max_prompts: int | None = typer.Option(
        None, "--max-prompts", help="Use only the first N prompts."
    ),
    bisect: bool = typer.Option(
        False, "--bisect", help="On failure, name the first module whose output diverges."
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds before the ranks are stopped."),
    engine: str = typer.Option(
        "native", "--engine", help="native (tfbackend's layers) or vllm (needs the vllm extra)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hub token for gated or private repos."
    ),
    offline: bool = typer.Option(False, "--offline", help="Use the local hub cache only."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the repo's own modelling code."
    ),
    reference: str = typer.Option(
        "auto",
        "--reference",
        help="memory (from_pretrained), streamed (one layer at a time from the safetensors), or "
        "auto: streamed when the model does not fit where the reference runs.",
    ),
    launcher: str = typer.Option(
        "spawn",
        "--launcher",
        help="spawn (tfbackend starts one process per rank on this host) or torchrun (this "
        "process is one rank of a torchrun job, on one host or many).",
    ),
    original: str | None = typer.Option(
        None,
        "--original",
        help="For a folder `tfbackend convert` wrote: the checkpoint it was converted from, for "
        "the reference (default: the one its manifest records).",
    ),
    vllm_version: str | None = typer.Option(
        None,
        "--vllm-version",
        help="Run the plan of this vLLM version or profile, as `check --vllm-version` (default: "
        "installed, else newest).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report only."),
    debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks; keep and show the vLLM engine's log."
    ),
) -> None:
    """Build the wrapped model per rank and compare its logits with plain transformers."""
    from tfbackend.parity.launch import speaks
    from tfbackend.parity.ranks import one_run_per_process
    from tfbackend.parity.runner import PHASES, RunOptions
    from tfbackend.parity.runner import run as run_parity
    from tfbackend.report.run_console import live_progress, render_run

    options = RunOptions(
        tp=tp, pp=pp, device=device, dtype=dtype, reference_dtype=reference_dtype,
        prompts_file=prompts, max_prompts=max_prompts, bisect=bisect, timeout_s=timeout,
        engine=engine, offline=offline or None, trust_remote_code=trust_remote_code,
        revision=revision, token=token, reference=reference, launcher=launcher,
        debug=debug, original=original, vllm_version=vllm_version,
    )  # fmt: skip
    board = live_progress(PHASES) if speaks(options) else contextlib.nullcontext(_silent)
    with user_errors(debug, subject=f"running {model}"), one_run_per_process():
        with board as progress:
            report = run_parity(model, options, progress)
        if json_out:
            import json

            sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        else:
            render_run(report, show_log=debug)
    raise typer.Exit(report.exit_code)


def _silent(phase: str, status: str, detail: str = "") -> None:
    """Progress of a torchrun rank other than 0: rank 0 shows the run's."""
