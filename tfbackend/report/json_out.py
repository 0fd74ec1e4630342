"""JSON rendering: the versioned report schema (docs/json-schema.md), nothing else on stdout."""

from __future__ import annotations

import json
from typing import Any


def to_json(payload: Any) -> str:
    data = payload.to_dict() if hasattr(payload, "to_dict") else payload
    return json.dumps(data, indent=2, sort_keys=False, default=_default)


def _default(obj: Any) -> Any:
    if hasattr(obj, "value"):
        return obj.value
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
