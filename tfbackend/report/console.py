"""Rich console rendering of a check report. Formats only: every number comes from the report."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tfbackend.plan import K_UNCHANGED
from tfbackend.report.model import CheckReport
from tfbackend.rules.findings import Severity, Verdict

VERDICT_STYLE = {
    Verdict.PASS: "bold green",
    Verdict.PASS_WITH_WARNINGS: "bold yellow",
    Verdict.FAIL: "bold red",
}
SEVERITY_STYLE = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def make_console(stderr: bool = False, width: int | None = None) -> Console:
    # rich drops colour itself when the stream is not a TTY (or NO_COLOR is set).
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def print_whole(console: Console, renderable) -> None:
    """Print a table (or lines) with every value in full.

    Without a terminal (a CI log, `| tee`) rich lays tables out in 80 columns (or $COLUMNS) and
    cuts what does not fit to `2.98e…`: there the table gets the width it needs instead (a log
    line may be long; a number may not be cut). In a terminal the table keeps the terminal's
    width and folds a value that does not fit onto the next line, never an ellipsis.
    """
    if isinstance(renderable, Table):
        for column in renderable.columns:
            column.overflow = "fold"
    if console.is_terminal:
        console.print(renderable)
        return
    need = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    width = console.width
    if need <= width:
        console.print(renderable)
        return
    console.width = need
    try:
        console.print(renderable)
    finally:
        console.width = width


def shape(s: list[int] | None) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]" if s else "—"


def _num(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _params(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summary_table(report: CheckReport) -> Table:
    s = report.summary
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("architecture", s.architecture or s.model_class, "parameters", _params(s.parameters)),
        ("model_type", s.model_type, "layers", _num(s.layers)),
        ("hidden", _num(s.hidden_size), "heads / kv", f"{_num(s.heads)} / {_num(s.kv_heads)}"),
        ("head dim", _num(s.head_dim), "intermediate", _num(s.intermediate_size)),
        ("vocab", _num(s.vocab_size), "tied embeddings", "yes" if s.tie_word_embeddings else "no"),
        ("dtype", s.dtype or "—", "quantization", s.quantization or "none"),
        ("read with", _read_with(report), "vLLM here", _vllm_here(report)),
    ]
    if s.num_experts:
        rows.append(
            (
                "experts",
                f"{s.num_experts} (top-{s.experts_per_token}, shared {s.shared_experts})",
                "expert intermediate",
                _num(s.moe_intermediate_size),
            )
        )
    if s.sliding_window:
        rows.append(
            ("sliding window", _num(s.sliding_window), "sliding layers", str(s.sliding_layers))
        )
    for row in rows:
        t.add_row(*row)
    return t


def _read_with(report: CheckReport) -> str:
    rw = report.read_with
    if not rw.get("transformers"):
        return "—"
    where = {True: "inside", False: "outside", None: "against"}[rw.get("in_range")]
    return f"transformers {rw['transformers']} ({where} {rw['serving_range']})"


def _vllm_here(report: CheckReport) -> str:
    v = report.versions
    if not v.get("vllm"):
        return "not installed"
    return f"{v.get('vllm_distribution') or 'vllm'} {v['vllm']}"


def _arrow_shape(s: list[int] | None, kind: str) -> str:
    # Linear weights are [out, in]: show them as in→out, the way people read a projection.
    if s and len(s) == 2 and kind in ("linear", "lm_head"):
        return f"[{s[1]}→{s[0]}]"
    return shape(s)


def plan_lines(report: CheckReport) -> Group:
    lines = []
    for g in report.groups:
        head = Text.assemble(
            (g.pattern, "bold"),
            f" ×{g.count}  ",
            f"{g.source_class}{_arrow_shape(g.full_shape, g.kind) if g.full_shape else ''} → ",
            (g.target, "bold"),
            f"  per rank {shape(g.rank_shape)}" if g.rank_shape else "",
        )
        why = g.reason
        if g.tp_key:
            why = f"{why}, key {g.tp_key!r}"
        if g.sources:
            why = f"fuses {', '.join(s.rsplit('.', 1)[-1] for s in g.sources)}; {why}"
        if g.stages and report.pp > 1:
            why = f"{why}; stage {', '.join(str(s) for s in sorted(g.stages))}"
        warn = g.fallback is not None or g.kind == K_UNCHANGED
        lines.append(head)
        lines.append(Text(f"    {why}", style="yellow" if warn else "dim"))
    return Group(*lines)


def attention_table(report: CheckReport) -> Table | None:
    specs = report.plan.attention
    if not specs:
        return None
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in (
        "layers",
        "type",
        "heads/rank",
        "kv/rank",
        "head size",
        "window",
        "soft-cap",
        "stage",
    ):
        t.add_column(col)
    groups: list[list] = []
    for a in specs:
        key = (
            a.attn_type,
            a.heads_per_rank,
            a.kv_heads_per_rank,
            a.kv_replicated,
            a.head_size,
            a.sliding_window,
            a.logits_soft_cap,
            a.stage,
            a.qualname is None,
        )
        if groups and groups[-1][0] == key and groups[-1][2] == a.layer_idx - 1:
            groups[-1][2] = a.layer_idx
        else:
            groups.append([key, a.layer_idx, a.layer_idx])
    for key, lo, hi in groups:
        attn_type, hpr, kvpr, kv_rep, hs, win, cap, stage, missing = key
        layers = str(lo) if lo == hi else f"{lo}–{hi}"
        t.add_row(
            layers,
            "NOT DISPATCHED" if missing else attn_type,
            _num(hpr),
            f"{_num(kvpr)}{' (replicated)' if kv_rep else ''}",
            _num(hs),
            _num(win) if win else "full",
            str(cap) if cap else "—",
            str(stage),
        )
    return t


def moe_table(report: CheckReport) -> Table | None:
    if not report.plan.moe:
        return None
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("experts", "×", "layout", "E", "top-k", "inter/rank", "act", "shared", "bias"):
        t.add_column(col)
    seen: dict[tuple, list] = {}
    for m in report.plan.moe:
        from tfbackend.replace.grouping import pattern_of

        key = (
            pattern_of(m.qualname),
            m.layout,
            m.num_experts,
            m.top_k,
            m.intermediate_per_rank,
            m.activation,
            m.num_shared_experts,
            m.has_bias,
        )
        seen.setdefault(key, [0])[0] += 1
    for key, (count,) in seen.items():
        pat, layout, e, k, ipr, act, shared, bias = key
        t.add_row(
            pat,
            str(count),
            layout,
            _num(e),
            _num(k),
            _num(ipr),
            act,
            str(shared),
            "yes" if bias else "no",
        )
    return t


def stages_table(report: CheckReport) -> Table | None:
    if report.pp <= 1 or not report.plan.stages:
        return None
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("stage", "layers", "count", "keeps", "missing", "lm_head"):
        t.add_column(col)
    for st in report.plan.stages:
        start, end = st.layers
        t.add_row(
            str(st.rank),
            f"{start}–{end - 1}" if end > start else "none",
            str(end - start),
            ", ".join(st.modules) or "—",
            ", ".join(st.missing) or "—",
            "yes" if st.has_lm_head else "no",
        )
    return t


def findings_table(report: CheckReport) -> Table | Text:
    if not report.findings:
        return Text("no findings", style="green")
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("rule")
    t.add_column("severity")
    t.add_column("finding", overflow="fold", ratio=3)
    t.add_column("fix", overflow="fold", ratio=2)
    for f in report.findings:
        t.add_row(
            f.rule_id, Text(f.severity.value, style=SEVERITY_STYLE[f.severity]), f.message, f.fix
        )
    return t


def render_check(report: CheckReport, console: Console) -> None:
    s = report.summary
    title = (
        f"tfbackend check · {s.source} · tp={report.tp} pp={report.pp} · profile {report.profile}"
    )
    print_whole(
        console, Panel(summary_table(report), title=title, title_align="left", box=box.ROUNDED)
    )
    console.rule("replacement plan", align="left")
    print_whole(console, plan_lines(report))
    for heading, table in (
        ("attention", attention_table(report)),
        ("experts", moe_table(report)),
        ("pipeline stages", stages_table(report)),
    ):
        if table is not None:
            console.rule(heading, align="left")
            print_whole(console, table)
    for note in report.plan.notes:
        console.print(Text(f"note: {note}", style="dim"))
    for name, data in report.sections.items():
        render_section(name, data, console)
    console.rule("findings", align="left")
    console.print(findings_table(report))
    counts = {sev: sum(1 for f in report.findings if f.severity is sev) for sev in Severity}
    verdict = Text(f"{report.verdict.value}", style=VERDICT_STYLE[report.verdict])
    tail = Text(
        f"  {counts[Severity.ERROR]} error(s), {counts[Severity.WARNING]} warning(s), "
        f"{counts[Severity.INFO]} info"
    )
    console.print(Group(Text.assemble("verdict: ", verdict, tail)))


def render_section(name: str, data, console: Console) -> None:
    """Sections added by later checks render themselves from `tfbackend.report.sections.<name>`."""
    import importlib

    try:
        module = importlib.import_module(f"tfbackend.report.sections.{name}")
    except ModuleNotFoundError:
        return
    from tfbackend.report.model import plain

    console.rule(name.replace("_", " "), align="left")
    module.render(plain(data), console)
