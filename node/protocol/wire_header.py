"""The form of the protocol's HTTP headers (`X-Payment`, `X-Receipt-Read`): base64url, no padding, of
the UTF-8 JSON of one object."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def encode_header(body: dict[str, Any]) -> str:
    """base64url (no padding) of the compact UTF-8 JSON of `body`."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_header(value: str) -> Any:
    """The JSON value inside a header; ValueError if it is not base64url (padded or not) of UTF-8 JSON, or
    names a field twice."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc
    return json.loads(raw, object_pairs_hook=unique_fields)


def unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of a payment header, whose fields are named once: readers differ on which of two
    counts (Python's the last, others the first), so a header that names one twice is refused (ValueError)."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        names = [name for name, _ in pairs]
        twice = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"the field {twice[:40]!r} is named twice")
    return fields
