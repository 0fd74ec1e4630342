"""Byte sizes as the console sections print them."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2


def size(n: int, smallest: str = "KiB") -> str:
    """GiB from a tenth of a GiB up, else MiB, else KiB (unless `smallest` is "MiB")."""
    if n >= GIB // 10:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB or smallest == "MiB":
        return f"{n / MIB:.2f} MiB"
    return f"{n / 1024:.2f} KiB"


def gib(n: int) -> str:
    """Always in GiB: memory budgets read best in one unit."""
    return f"{n / GIB:.2f} GiB"
