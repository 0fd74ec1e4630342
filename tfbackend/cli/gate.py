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
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Gate many models at once: each must meet its expected verdict (exit 0), else exit 1."""
    from tfbackend.gate.baseline import apply_baseline, load_baseline
    from tfbackend.gate.manifest import load_manifest, select_models
    from tfbackend.gate.runner import GateOptions, run_gate

    with user_errors(debug):
        if device not in ("auto", "cuda", "cpu"):
            from tfbackend.errors import UserError

            raise UserError(f"--device must be auto, cuda or cpu, got {device!r}")
        loaded = load_manifest(manifest)
        if only:
            loaded = select_models(
                loaded, [n.strip() for v in only for n in v.split(",") if n.strip()]
            )
        # read the baseline before the long part, so a wrong path fails in a second
        previous = load_baseline(baseline) if baseline else None
        report = run_gate(
            loaded,
            GateOptions(
                run=run, device=device, token=token, offline=offline or None, progress=progress
            ),
        )
        if previous:
            apply_baseline(report, previous, rel_tol=tolerance)
        _write_files(report, junit, markdown, json_file)

    from tfbackend.report.console import make_console
    from tfbackend.report.gate_console import render_gate

    render_gate(report, make_console())
    raise typer.Exit(report.exit_code)


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
