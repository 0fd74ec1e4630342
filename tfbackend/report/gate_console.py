"""Rich console rendering of a gate: the summary table, regressions, and what to look at."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tfbackend.report.console import SEVERITY_STYLE, VERDICT_STYLE, print_whole
from tfbackend.rules.findings import Severity

STATUS_STYLE = {
    "met": "green",
    "missed": "bold red",
    "better than expected": "bold red",
    "error": "bold magenta",
}


def render_gate(report, console: Console) -> None:
    table = Table(box=box.SIMPLE_HEAD, title=f"tfbackend gate · {report.manifest}")
    for col in ("model", "layouts", "verdict", "expected", "result", "errors / warnings"):
        table.add_column(col)
    for r in report.results:
        v = r.verdict
        errors = sum(f.severity is Severity.ERROR for c in r.checks for f in c.findings)
        warnings = sum(f.severity is Severity.WARNING for c in r.checks for f in c.findings)
        status = r.status + (" · regressed" if r.regressions else "")
        table.add_row(
            escape(r.name),
            ", ".join(c.layout for c in r.checks),
            f"[{VERDICT_STYLE[v]}]{v.value}[/]" if v else "[bold magenta]ERROR[/]",
            r.model.expected_label,
            f"[{STATUS_STYLE[r.status]}]{status}[/]",
            f"{errors} / {warnings}",
        )
    print_whole(console, table)

    for r in report.results:
        for c in r.checks:
            if c.error:
                console.print(
                    f"[bold magenta]{escape(r.name)}[/] {c.layout}: could not check: {escape(c.error)}"
                )
        if not r.met and r.verdict is not None:
            for c in r.checks:
                for f in c.findings:
                    if f.severity is not Severity.INFO:
                        style = SEVERITY_STYLE[f.severity]
                        console.print(
                            f"[bold]{escape(r.name)}[/] {c.layout} [{style}]{f.rule_id}[/] "
                            f"{escape(f.message)}"
                        )
        for run in r.runs:
            if run.status != "passed":
                console.print(
                    f"[dim]{escape(r.name)} run {run.layout}: {escape(_run_text(run))}[/]"
                )

    if report.baseline:
        if report.regressions:
            console.print(f"[bold red]Regressions vs {report.baseline}:[/]")
            for c in report.regressions:
                console.print(
                    f"  [red]{escape(c.model)}[/] {c.layout} {c.kind}: {escape(c.message)}"
                )
        else:
            console.print(f"[green]No regressions vs {report.baseline}.[/]")

    met = sum(r.met for r in report.results)
    style = "bold green" if report.passed else "bold red"
    console.print(
        f"[{style}]{met} of {len(report.results)} models met their expectation[/]"
        f" ({report.seconds:.1f} s)"
    )


def _run_text(run) -> str:
    # skip reasons already say "run skipped" or how to ask for a run
    return run.message if run.status == "skipped" else f"{run.status}: {run.message}"
