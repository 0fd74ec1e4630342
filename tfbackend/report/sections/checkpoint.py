"""Console section: the checkpoint's headers against the model (data from the report only)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tfbackend.report.console import print_whole
from tfbackend.units import size


def _size(n: int) -> str:
    return size(n, smallest="MiB")


def render(data, console: Console) -> None:
    cmp = data.to_dict() if hasattr(data, "to_dict") else data
    h = cmp["headers"]
    if h["format"] == "none":
        console.print(Text("no weight files next to the config: nothing to compare", style="dim"))
        return
    if h["format"] == "pickle":
        console.print(Text(f"pickle only: {', '.join(h['pickle_files'])} (never opened)", "yellow"))
        return
    if h["format"] == "unavailable":
        console.print(Text(f"not checked: {h['unavailable_reason']}", style="yellow"))
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    dtypes = ", ".join(f"{k} {_size(v)}" for k, v in h["bytes_by_dtype"].items())
    files = f"{len(h['files'])} file(s){' (sharded)' if h['sharded'] else ''}, {h['origin']}"
    t.add_row("files", files)
    t.add_row("tensors", f"{h['num_tensors']:,} · {_size(h['total_bytes'])} · {dtypes}")
    t.add_row("served as", cmp["served_dtype"])
    loaded = f"{cmp['loaded']:,} loaded"
    if cmp["renamed"]:
        loaded += f" ({cmp['renamed']} renamed by the loader)"
    if cmp["experts_merged"]:
        loaded += f", {cmp['experts_merged']} per-expert tensors into 3-D experts"
    t.add_row("mapping", loaded)
    lm = "tied: embedding" if cmp["tied_lm_head"] else "own weight"
    t.add_row("lm_head", lm + (", in checkpoint" if cmp["lm_head_in_checkpoint"] else ""))
    for label, key, style in (
        ("missing", "missing", "red"),
        ("unexpected", "unexpected", "red"),
    ):
        if cmp[key]:
            t.add_row(label, Text(f"{len(cmp[key])}: {', '.join(cmp[key][:3])}…", style=style))
    if cmp["shape_mismatches"]:
        t.add_row("wrong shape", Text(str(len(cmp["shape_mismatches"])), style="red"))
    if cmp["ignored"]:
        t.add_row("ignored", f"{len(cmp['ignored'])} (see TFB707)")
    print_whole(console, t)
    for note in cmp["notes"]:
        console.print(Text(f"note: {note}", style="dim"))
