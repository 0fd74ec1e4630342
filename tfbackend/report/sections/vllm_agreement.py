"""Console rendering of the `--with-vllm` agreement section."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from tfbackend.report.console import print_whole


def render(data: dict, console) -> None:
    compared, agreed = data.get("compared", 0), data.get("agreed", 0)
    style = "green" if data.get("full") else "red"
    console.print(
        Text.assemble(
            ("full agreement" if data.get("full") else "disagreement", style),
            f": {agreed}/{compared} checks agree with vLLM's own build at tp={data['tp']} "
            f"pp={data['pp']} ({data.get('seconds', 0):.0f}s)",
        )
    )
    subs = data.get("substitutions") or []
    console.print(f"stand-ins: {', '.join(subs) if subs else 'none needed (meta build)'}")
    if data.get("vllm_error"):
        console.print(Text(f"vLLM raised: {data['vllm_error'].splitlines()[0]}", style="red"))
    if data.get("run_error"):
        console.print(Text(f"run: {data['run_error']}", style="yellow"))
    rows = data.get("disagreements") or []
    if rows:
        table = Table("rank", "module", "what", "tfbackend", "vLLM")
        for d in rows[:40]:
            table.add_row(str(d["rank"]), d["qualname"], d["what"], d["ours"], d["vllm"])
        print_whole(console, table)
