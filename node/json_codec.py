"""JSON as bytes on the paid path (answers, stream chunks, the stored response): orjson, several times
the standard library's speed on a response body, and the standard library for the little orjson
refuses (an integer past 64 bits, a key that is not a string), so every value that encoded before
still does. A float that is not finite is written `null` (the standard library wrote `NaN`, which
neither JSON nor PostgreSQL's jsonb accepts)."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Compact JSON (no spaces), UTF-8."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: a type or a size it does not take
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
