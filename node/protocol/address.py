"""EIP-55 checksummed addresses, on the request path (eth_utils' own takes ~50 us: it validates and
converts its input several ways; the callers here have already checked that they hold 0x + 40 hex)."""

from __future__ import annotations

from functools import lru_cache

from eth_hash.auto import keccak

from node.protocol.hexstr import to_hex

_UPPER_NIBBLES = frozenset("89abcdef")


@lru_cache(maxsize=65_536)  # the same few addresses (node, router, token, each payer) on every request
def checksum_address(address: str) -> str:
    """0x + 40 hex digits, each letter upper-cased where the same nibble of keccak(lower hex) >= 8."""
    low = address[2:].lower()
    digest = keccak(low.encode()).hex()
    return "0x" + "".join(c.upper() if h in _UPPER_NIBBLES else c for c, h in zip(low, digest, strict=False))


def checksum_from_bytes(address: bytes) -> str:
    """The checksummed form of a 20-byte address."""
    return checksum_address(to_hex(address))
