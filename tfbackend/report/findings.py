"""Moved to `tfbackend.rules.findings` (findings are what rules produce; renderers read them).

Kept so code written against the old path still imports; new code imports the new one.
"""

from tfbackend.rules.findings import (  # noqa: F401
    Finding,
    Severity,
    Verdict,
    sort_findings,
    verdict_of,
)
