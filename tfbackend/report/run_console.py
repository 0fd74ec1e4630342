"""Console output for `run`: live phase progress on stderr, then the parity report."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tfbackend.report.console import make_console, print_whole
from tfbackend.units import gib

if TYPE_CHECKING:  # renderers read the run's result; they never import the runner
    from tfbackend.parity.result import RunReport

_MARK = {"running": "[yellow]…[/]", "done": "[green]✓[/]", "pending": "[dim]·[/]"}


class _PhaseBoard:
    def __init__(self, phases: tuple[str, ...]):
        self.state = {p: ("pending", "") for p in phases}
        self.started: dict[str, float] = {}

    def update(self, phase: str, status: str, detail: str = "") -> None:
        if status == "running":
            self.started.setdefault(phase, time.perf_counter())
        self.state[phase] = (status, detail or self.state.get(phase, ("", ""))[1])

    def render(self) -> Table:
        table = Table.grid(padding=(0, 1))
        for phase, (status, detail) in self.state.items():
            table.add_row(_MARK.get(status, status), phase, f"[dim]{detail}[/]")
        return table


@contextlib.contextmanager
def live_progress(phases: tuple[str, ...]):
    """A progress callback drawing the run's `phases` on stderr (a plain log when stderr is not
    a terminal)."""
    console = Console(stderr=True)
    board = _PhaseBoard(phases)
    if not console.is_terminal:

        def log(phase: str, status: str, detail: str = "") -> None:
            if status == "done":
                console.print(f"{phase}: done {detail}".rstrip(), highlight=False)

        yield log
        return
    with Live(board.render(), console=console, transient=True, refresh_per_second=8) as live:

        def update(phase: str, status: str, detail: str = "") -> None:
            board.update(phase, status, detail)
            live.update(board.render())

        yield update


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "—" if x is None else format(x, spec)


def _gib(n: int | None) -> str:
    return "—" if not n else gib(n)


def render_run(
    report: RunReport, console: Console | None = None, *, show_log: bool = False
) -> None:
    console = console or make_console()
    console.print(
        f"[bold]{report.model}[/]  engine {report.engine}"
        + (f" ({report.engine_version})" if report.engine_version else "")
        + f" · tp {report.tp} · pp {report.pp} · "
        f"{report.device} · {report.dtype} (reference {report.reference_dtype}) · plan {report.profile}"
    )
    console.print(f"[dim]inputs: {report.prompt_source}[/]")
    if report.prompts:
        table = Table(title="parity per prompt", title_justify="left")
        for col in (
            "prompt",
            "positions",
            "top-1",
            "top-k ⊂",
            "KL mean",
            "KL max",
            "max |Δlogprob| top-k",
            "max |Δlogit|",
            "",
        ):
            table.add_column(col, justify="right" if col not in ("prompt", "") else "left")
        for m in report.prompts:
            failed = m.name in report.failures
            table.add_row(
                m.name, str(m.positions), f"{m.top1_agreement:.3f}", f"{m.topk_containment:.3f}",
                _fmt(m.kl_mean), _fmt(m.kl_max), _fmt(m.max_dlogprob_topk), _fmt(m.max_dlogit),
                "[red]fail[/]" if failed else "[green]ok[/]",
            )  # fmt: skip
        print_whole(console, table)
        for name, why in report.failures.items():
            console.print(f"  [red]{name}[/]: {'; '.join(why)}")
    if report.ranks:
        table = Table(title="ranks", title_justify="left")
        for col in (
            "rank",
            "stage",
            "tp rank",
            "shard",
            "read",
            "peak",
            "init",
            "build",
            "load",
            "forward",
        ):
            table.add_column(col, justify="right")
        for r in report.ranks:
            table.add_row(
                str(r.rank), str(r.stage), str(r.tp_rank), _gib(r.shard_bytes), _gib(r.bytes_read),
                f"{_gib(r.peak_bytes)} ({'GPU' if r.peak_kind.startswith('cuda') else 'RSS'})",
                *(f"{r.phases.get(p, 0):.2f}s" for p in ("init", "build", "load", "forward")),
            )  # fmt: skip
        print_whole(console, table)
    if report.reference_mode:
        peak = "GPU" if report.reference_peak_kind.startswith("cuda") else "RSS growth"
        read = f", read {_gib(report.reference_bytes_read)}" if report.reference_bytes_read else ""
        console.print(
            f"reference: {report.reference_mode}, peak {_gib(report.reference_peak_bytes)} ({peak}){read}"
        )
    console.print("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.phases.items()))
    if report.vllm_failure:
        console.print(Text(report.vllm_failure.line(), style="red"))
        if show_log and report.vllm_failure.log_tail:
            console.print(f"[dim]vLLM's log, rank {report.vllm_failure.rank} (last lines):[/]")
            for line in report.vllm_failure.log_tail:
                console.print(Text(line, style="dim"), soft_wrap=True)
    elif report.model_error:
        console.print(f"[red]the wrapped model raised:[/] {report.model_error}")
    if report.divergence:
        d = report.divergence
        what = (
            f"relative error {d.rel_error:.2e}"
            if d.rel_error is not None
            else (d.error or "raised")
        )
        console.print(f"[red]first divergent module:[/] [bold]{d.module}[/] ({what})")
        if d.plan_entry:
            e = d.plan_entry
            console.print(
                f"  plan entry: {e['qualname']} → {e['target']} (tp_plan {e.get('tp_key')!r}: "
                f"{e.get('tp_style')!r}) — {e.get('reason', '')}"
            )
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")
    colour = "green" if report.verdict == "pass" else "red"
    console.print(f"[bold {colour}]verdict: {report.verdict}[/]")
