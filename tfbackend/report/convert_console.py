"""Console output for `convert`: a byte progress bar on stderr, the findings it was decided on,
and what was written (or why nothing was)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from tfbackend.report.console import findings_table
from tfbackend.rules.findings import Severity
from tfbackend.units import size

if TYPE_CHECKING:  # renderers read the result; they never import the pipeline
    from tfbackend.convert.pipeline import ConvertResult


class _Bar:
    """The pipeline's `Progress`, drawn (it calls phase, start_writing, advance)."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None
        self.task = None

    def phase(self, name: str) -> None:
        if name != "write" and not self.console.is_terminal:
            self.console.print(f"{name} …", highlight=False)

    def start_writing(self, total_bytes: int) -> None:
        self.bar = Progress(
            TextColumn("writing"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("write", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, nbytes)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextlib.contextmanager
def convert_progress():
    """Progress drawn on stderr (rich drops the bar itself when stderr is not a terminal)."""
    bar = _Bar(Console(stderr=True))
    try:
        yield bar
    finally:
        bar.stop()


def render_findings(result: ConvertResult, console: Console) -> None:
    """The check findings that matter to the conversion: errors when refused, else warnings."""
    report = result.report
    shown = [f for f in report.findings if f.severity in (Severity.ERROR, Severity.WARNING)]
    if not shown:
        return
    console.rule(f"check · tp={report.tp} pp={report.pp} · {report.verdict.value}", align="left")
    console.print(findings_table(_only(report, shown)))


def _only(report, findings):
    from dataclasses import replace

    return replace(report, findings=findings)


def render_convert(result: ConvertResult, console: Console) -> None:
    if not result.converted:
        console.print(Text(f"not converted: {result.model}", style="bold red"))
        for why in result.blockers:
            console.print(f"  - {why}", highlight=False, soft_wrap=True)
        console.print("nothing was written")
        return
    m = result.manifest
    console.print(
        Text.assemble(
            ("converted ", "bold green"),
            f"{result.model} → {result.out}",
        )
    )
    files = sum(len(r.files) for r in m.ranks)
    console.print(
        f"  tp {m.tp} × pp {m.pp}, {m.dtype}: {files} file(s), "
        f"{size(result.bytes_written)} written in {result.seconds:.1f} s",
        highlight=False,
    )
    kwargs = ", ".join(f"{k}={v!r}" for k, v in m.llm_kwargs.items())
    console.print(
        f"  load with: LLM(model={result.out!r}, {kwargs})", highlight=False, soft_wrap=True
    )
