"""Regenerate docs/rules.md from the rule registry: `python3 scripts/rules_doc.py`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from tfbackend.rules.pages import catalog

    out = ROOT / "docs" / "rules.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(catalog())
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
