"""`convert --json`: the manifest when converted, the refusal and its findings when not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # renderers read the result; they never import the pipeline
    from tfbackend.convert.pipeline import ConvertResult


def convert_json(result: ConvertResult) -> dict[str, Any]:
    report = result.report
    return {
        "converted": result.converted,
        "exit_code": result.exit_code,
        "model": result.model,
        "out": result.out if result.converted else None,
        "blockers": list(result.blockers),
        "verdict": report.verdict.value,
        "findings": [f.to_dict() for f in report.findings],
        "seconds": round(result.seconds, 3),
        "bytes_written": result.bytes_written,
        "manifest": result.manifest.to_dict() if result.manifest else None,
    }
