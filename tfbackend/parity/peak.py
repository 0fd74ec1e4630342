"""Peak host memory of a phase of this process: the kernel's resident-set high-water mark, reset at
the start of the phase (Linux `/proc/self/clear_refs`), minus the resident set it started from.

RSS counts the checkpoint pages a tensor maps from a safetensors file as well as allocated ones:
both occupy RAM while the phase holds them, so both are counted. Sampling RSS from a thread would
miss short peaks; the high-water mark does not.
"""

from __future__ import annotations

import re
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS (also what `getrusage` reports as
    ru_maxrss from now on). False where the kernel does not offer it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class HostPeak:
    """`with HostPeak() as peak: ...` then `peak.growth_bytes` (None off Linux)."""

    def __init__(self) -> None:
        self.growth_bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> HostPeak:
        self._start = _status_kib("VmRSS") if reset_peak() else None
        return self

    def __exit__(self, *exc) -> None:
        high = _status_kib("VmHWM")
        if self._start is not None and high is not None:
            self.growth_bytes = max(0, high - self._start) * 1024
