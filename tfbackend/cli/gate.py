"""`tfbackend gate`: check (and optionally run) every model of a manifest; exit 1 on a miss."""

from __future__ import annotations

import typer

from tfbackend.cli.app import app
from tfbackend.cli.errors import user_errors


@app.command()
def gate(
    manifest: str = typer.Argument(..., help="models.toml (or .yaml): the models to gate."),
    junit: str | None = typer.Option(None, "--junit", help="Write JUnit XML here."),
    markdown: str | None = typer.Option(
        None, "--markdown", help="Write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)."
    ),
    json_file: str | None = typer.Option(
        None, "--json", help="Write the gate JSON here (a later run's --baseline)."
    ),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="Gate only these models (names as in reports; repeat or comma-separate).",
    ),
    baseline: str | None = typer.Option(
        None, "--baseline", help="A previous gate JSON: mark and fail on what got worse."
    ),
    tolerance: float = typer.Option(
        0.25, "--tolerance", help="Relative change of a parity metric that counts as worse."
    ),
    run: bool = typer.Option(
        False, "--run", help="Also run parity for models with `run = true` (needs GPUs)."
    ),
    device: str = typer.Option("auto", "--device", help="Where runs go: auto, cuda or cpu."),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hub token for gated or private repos."
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Use the local hub cache only (as HF_HUB_OFFLINE=1)."
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Allow every model's own code (a model's `trust_remote_code = true` allows only its "
        "own).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Gate many models at once: each must meet its expected verdict (exit 0), else exit 1."""
    from tfbackend.gate.baseline import apply_baseline, load_baseline
    from tfbackend.gate.manifest import load_manifest, select_models
    from tfbackend.gate.runner import GateOptions, run_gate

    with user_errors(debug, subject=f"gating {manifest}"):
        from tfbackend.limits import check_non_negative

        if device not in ("auto", "cuda", "cpu"):
            from tfbackend.errors import UserError

            raise UserError(f"--device must be auto, cuda or cpu, got {device!r}")
        check_non_negative("--tolerance", tolerance, " (a relative change, e.g. 0.25)")
        loaded = load_manifest(manifest)
        _refuse_overwriting_inputs(loaded, baseline, junit, markdown, json_file)
        if only:
            loaded = select_models(
                loaded, [n.strip() for v in only for n in v.split(",") if n.strip()]
            )
        # read the baseline before the long part, so a wrong path fails in a second
        previous = load_baseline(baseline) if baseline else None
        report = run_gate(
            loaded,
            GateOptions(
                run=run,
                device=device,
                token=token,
                offline=offline or None,
                progress=progress,
                trust_remote_code=trust_remote_code,
            ),  # fmt: skip
        )
        if previous:
            apply_baseline(report, previous, rel_tol=tolerance)
        _write_files(report, junit, markdown, json_file)

    from tfbackend.report.console import make_console
    from tfbackend.report.gate_console import render_gate

    render_gate(report, make_console())
    raise typer.Exit(report.exit_code)


def _refuse_overwriting_inputs(manifest, baseline, junit, markdown, json_file) -> None:
    """No report over the manifest, the baseline, or into a local model's folder."""
    from pathlib import Path

    from tfbackend.report.files import check_outputs

    files = [("the manifest", manifest.path)] + ([("the baseline", baseline)] if baseline else [])
    local = [(m, Path(m.source)) for m in manifest.models if Path(m.source).is_absolute()]
    folders = [
        (f"the folder of model {m.name!r}", p if p.is_dir() else p.parent)
        for m, p in local
        if p.exists()
    ]
    if len(local) < len(manifest.models):  # hub ids: their files live in the hub cache
        from huggingface_hub import constants

        folders.append(("the hub cache", constants.HF_HUB_CACHE))
    check_outputs(
        {"--junit": junit, "--markdown": markdown, "--json": json_file},
        files=files,
        folders=folders,
    )


def _write_files(report, junit: str | None, markdown: str | None, json_file: str | None) -> None:
    from tfbackend.report.files import write_report_file

    if junit:
        from tfbackend.report.junit import gate_junit

        write_report_file(junit, gate_junit(report))
    if markdown:
        from tfbackend.report.markdown import gate_markdown

        write_report_file(markdown, gate_markdown(report))
    if json_file:
        from tfbackend.report.json_out import to_json

        write_report_file(json_file, to_json(report) + "\n")
