"""Console section: memory per rank, like `accelerate estimate-memory` but for each rank."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tfbackend.report.console import print_whole
from tfbackend.units import size


def render(data, console: Console) -> None:
    mem = data.to_dict() if hasattr(data, "to_dict") else data
    head = (
        f"dtype {mem['dtype']} · max-model-len {mem['max_model_len']:,} · "
        f"{mem['gpu_memory_gib']:g} GiB × {mem['gpu_memory_utilization']:.0%} per GPU · "
        f"whole model {size(mem['model_weight_bytes'])}"
    )
    console.print(Text(head))
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in (
        "ranks",
        "stage",
        "layers",
        "weights",
        "largest",
        "KV/token",
        "KV@len",
        "total",
        "tokens fit",
        "fits",
    ):
        t.add_column(col)
    for st in mem["stages"]:
        lo, hi = st["ranks"][0], st["ranks"][-1]
        start, end = st["layers"]
        fit = Text("yes", "green") if st["fits"] else Text("NO", "bold red")
        t.add_row(
            str(lo) if lo == hi else f"{lo}–{hi}",
            str(st["stage"]),
            f"{start}–{end - 1}" if end > start else "none",
            size(st["weight_bytes"]),
            size(st["largest_tensor_bytes"]),
            size(st["kv_bytes_per_token"]),
            size(st["kv_bytes_max_len"]),
            size(st["total_bytes"]),
            "—" if st["max_kv_tokens"] is None else f"{st['max_kv_tokens']:,}",
            fit,
        )
    print_whole(console, t)
    console.print(Text(f"note: max-model-len {mem['max_model_len_note']}", style="dim"))
    for note in mem["notes"]:
        console.print(Text(f"note: {note}", style="dim"))
