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
    """The JSON value inside a header; ValueError if it is not base64url (padded or not) of UTF-8 JSON."""
    try:
        return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc
