"""0x-hex strings, the one form bytes take in JSON, the database and the API.

    to_hex(b"\x12\x34")            -> "0x1234" (lowercase)
    normalize("0xABCD" | "abcd")   -> "0xabcd"
    from_hex("0x1234")             -> b"\x12\x34" (bare hex accepted, any case)
    parse_hash(text, name)         -> 32 bytes, or BadRequest naming `name`
"""

from __future__ import annotations

import re

from node.errors import BadRequest

_HEX = re.compile(r"^(0[xX])?([0-9a-fA-F]{2})*$")


def to_hex(value: bytes) -> str:
    """"0x" + lowercase hex digits."""
    return "0x" + value.hex()


def normalize(value: bytes | bytearray | str) -> str:
    """Lowercase 0x-hex of bytes, or of a hex string with or without its 0x (as RPC nodes send them)."""
    if isinstance(value, bytes | bytearray):
        return to_hex(bytes(value))
    return value.lower() if value.startswith("0x") else "0x" + value.lower()


def from_hex(text: str) -> bytes:
    """The bytes of 0x-hex or bare hex (any case); ValueError if it is not hex."""
    if not _HEX.fullmatch(text):
        raise ValueError(f"not hex: {text[:80]!r}")
    return bytes.fromhex(text[2:] if text[:2] in ("0x", "0X") else text)


def parse_bytes(text: object, name: str, size: int) -> bytes:
    """`size` bytes from 0x-hex or bare hex; BadRequest naming the field `name` otherwise."""
    try:
        raw = from_hex(text) if isinstance(text, str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != size:
        raise BadRequest(f"{name} must be {size} bytes of 0x-hex", field=name, value=repr(text)[:100])
    return raw


def parse_hash(text: object, name: str) -> bytes:
    """A 32-byte hash from 0x-hex; BadRequest naming the field `name` otherwise."""
    return parse_bytes(text, name, 32)
