"""OpenZeppelin `StandardMerkleTree`, in Python, byte for byte.

Leaves are `keccak256(keccak256(abi.encode(types, value)))`, sorted by hash; the tree is the npm
library's flat array (root at 0, children of i at 2i+1 and 2i+2, leaves at the end in reverse sorted
order), nodes hash their children as a sorted pair. So the root, every proof and `to_json()` (the
library's `standard-v1` dump) equal what `@openzeppelin/merkle-tree` 1.0.x gives for the same values,
and proofs verify on chain with OpenZeppelin's `MerkleProof`.

Static leaf types (address, bool, uintN, intN, bytesN) are encoded without eth_abi, which keeps a
million-leaf rewards tree to a few seconds; anything else goes through eth_abi.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import encode
from eth_hash.auto import keccak as keccak256

from node.protocol.hexstr import from_hex, to_hex

log = logging.getLogger(__name__)

_STATIC = re.compile(r"^(address|bool|u?int(\d{1,3})?|bytes([1-9]|[12]\d|3[0-2]))$")


Hasher = Callable[[bytes], bytes]


class _BulkKeccak:
    """keccak256 through pycryptodome's C state, reset per message: about 3x less Python overhead
    per hash than a fresh hash object, which is what dominates a million-leaf tree. One per build
    (the state is not shared between threads); `hasher()` falls back to eth_hash if the library moves."""

    def __init__(self) -> None:
        # the raw API's own argument types: pycryptodome calls its C library through cffi when cffi is
        # installed, else through ctypes, and each backend takes only its own (pycryptodome's stubs declare
        # neither the module's private library handle nor c_ubyte, and omit create_string_buffer's size default)
        from Crypto.Hash.keccak import _raw_keccak_lib as lib  # type: ignore[attr-defined]
        from Crypto.Util._raw_api import (  # type: ignore[attr-defined]
            VoidPointer,
            c_size_t,
            c_ubyte,
            create_string_buffer,
            get_raw_buffer,
        )

        self._lib = lib
        state = VoidPointer()
        if lib.keccak_init(state.address_of(), c_size_t(64), c_ubyte(24)):
            raise RuntimeError("keccak_init failed")
        self._state = state.get()
        self._out = create_string_buffer(32)  # type: ignore[call-arg]
        self._raw = get_raw_buffer
        self._size, self._rounds = c_size_t(32), c_ubyte(1)
        self._reset, self._absorb, self._digest = lib.keccak_reset, lib.keccak_absorb, lib.keccak_digest

    def __call__(self, data: bytes) -> bytes:
        self._reset(self._state)
        self._absorb(self._state, data, len(data))
        self._digest(self._state, self._out, self._size, self._rounds)
        return bytes(self._raw(self._out))

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            self._lib.keccak_destroy(state)


def hasher() -> Hasher:
    """The fast keccak when it works here and hashes as keccak256; else keccak256. Any failure of the
    fast path (a library that moved or changed backend) falls back: it must never stop settlement."""
    try:
        fast = _BulkKeccak()
        probes = (b"", b"\x01" * 200)
        if all(fast(p) == keccak256(p) for p in probes):
            return fast
    except Exception:  # whatever it is, the slower hash is correct
        log.warning("the fast keccak is unavailable here; trees are hashed with eth_hash", exc_info=True)
    return keccak256


def node_hash(a: bytes, b: bytes, h: Hasher = keccak256) -> bytes:
    return h(a + b if a <= b else b + a)


def _address(value: Any) -> bytes:
    if isinstance(value, str):
        value = bytes.fromhex(value[2:] if value[:2] in ("0x", "0X") else value)
    raw = value
    if len(raw) != 20:
        raise ValueError(f"address must be 20 bytes, got {len(raw)}")
    return b"\0" * 12 + bytes(raw)


def _word_encoder(abi_type: str) -> Callable[[Any], bytes]:
    """abi.encode of one static value of `abi_type` (32 bytes)."""
    if abi_type == "address":
        return _address
    if abi_type == "bool":
        return lambda v: (1 if v else 0).to_bytes(32, "big")
    if abi_type.startswith("bytes"):
        size = int(abi_type[5:])

        def fixed_bytes(v: Any) -> bytes:
            raw = from_hex(v) if isinstance(v, str) else bytes(v)
            if len(raw) != size:
                raise ValueError(f"{abi_type} needs {size} bytes, got {len(raw)}")
            return raw.ljust(32, b"\0")
        return fixed_bytes
    signed = not abi_type.startswith("u")
    bits = int(abi_type.lstrip("uint") or 256)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)

    def integer(v: Any) -> bytes:
        n = int(v, 0) if isinstance(v, str) else int(v)
        if not lo <= n < hi:
            raise ValueError(f"{n} out of range for {abi_type}")
        return n.to_bytes(32, "big", signed=signed)
    return integer


def _abi_value(abi_type: str, value: Any) -> Any:
    """A JSON-ish value (decimal string, 0x-hex) as eth_abi wants it."""
    if isinstance(value, list):
        inner = abi_type[: abi_type.rindex("[")]
        return [_abi_value(inner, v) for v in value]
    if isinstance(value, str) and re.match(r"^u?int", abi_type):
        return int(value, 0)
    if isinstance(value, str) and abi_type.startswith("bytes"):
        return from_hex(value)
    return value


def leaf_encoder(types: Sequence[str]) -> Callable[[Sequence[Any]], bytes]:
    """abi.encode(types, value) as a function of value; static types skip eth_abi."""
    types = list(types)
    if not all(_STATIC.match(t) for t in types):
        return lambda value: encode(types, [_abi_value(t, v) for t, v in zip(types, value, strict=True)])
    words = [_word_encoder(t) for t in types]

    def static(value: Sequence[Any]) -> bytes:
        if len(value) != len(words):
            raise ValueError(f"leaf has {len(value)} values for {len(words)} types")
        return b"".join([w(v) for w, v in zip(words, value, strict=True)])
    return static


def leaf_hash(types: Sequence[str], value: Sequence[Any], h: Hasher = keccak256) -> bytes:
    return h(h(leaf_encoder(types)(value)))


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    node = leaf
    for sibling in proof:
        node = node_hash(node, sibling)
    return node


def json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return to_hex(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)  # the npm library refuses JS numbers: big integers travel as strings
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


@dataclass(frozen=True)
class MerkleTree:
    """A built tree. `tree` is the flat node array; `tree_indices[i]` is value i's node."""

    types: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    tree: tuple[bytes, ...]
    tree_indices: tuple[int, ...]

    @classmethod
    def of(cls, values: Sequence[Sequence[Any]], types: Sequence[str], *,
           sort_leaves: bool = True) -> MerkleTree:
        if not values:
            raise ValueError("a Merkle tree needs at least one leaf")
        h, enc = hasher(), leaf_encoder(types)
        hashes = [h(h(enc(v))) for v in values]
        n = len(values)
        order = sorted(range(n), key=hashes.__getitem__) if sort_leaves else list(range(n))
        tree: list[bytes] = [b""] * (2 * n - 1)
        tree[n - 1:] = [hashes[i] for i in reversed(order)]  # leaf k of the sorted list sits at 2n-2-k
        for i in range(n - 2, -1, -1):
            left, right = tree[2 * i + 1], tree[2 * i + 2]
            tree[i] = h(left + right if left <= right else right + left)
        indices = [0] * n
        for k, value_index in enumerate(order):
            indices[value_index] = 2 * n - 2 - k
        return cls(tuple(types), tuple(tuple(v) for v in values), tuple(tree), tuple(indices))

    @property
    def root(self) -> bytes:
        return self.tree[0]

    def __len__(self) -> int:
        return len(self.values)

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from value `index`'s leaf up to the root (OZ `MerkleProof` order)."""
        i = self.tree_indices[index]
        out = []
        while i > 0:
            out.append(self.tree[i - 1 if i % 2 == 0 else i + 1])
            i = (i - 1) // 2
        return out

    def leaf(self, index: int) -> bytes:
        return self.tree[self.tree_indices[index]]

    @staticmethod
    def verify(root: bytes, types: Sequence[str], value: Sequence[Any], proof: Sequence[bytes]) -> bool:
        return process_proof(leaf_hash(types, value), proof) == root

    def to_json(self) -> dict[str, Any]:
        """The npm library's `dump()` format (`standard-v1`); `StandardMerkleTree.load` reads it."""
        return {
            "format": "standard-v1",
            "leafEncoding": list(self.types),
            "tree": [to_hex(h) for h in self.tree],
            "values": [{"value": json_value(list(v)), "treeIndex": i}
                       for v, i in zip(self.values, self.tree_indices, strict=True)],
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> MerkleTree:
        """Reads a `standard-v1` dump (ours or the npm library's) and checks every hash in it."""
        if data.get("format") != "standard-v1":
            raise ValueError(f"unknown Merkle tree format {data.get('format')!r}")
        types = tuple(data["leafEncoding"])
        tree = tuple(from_hex(h) for h in data["tree"])
        values = tuple(tuple(v["value"]) for v in data["values"])
        indices = tuple(int(v["treeIndex"]) for v in data["values"])
        loaded = cls(types, values, tree, indices)
        loaded.validate()
        return loaded

    def validate(self) -> None:
        n, h = len(self.tree), hasher()
        for i in range(n):
            left = 2 * i + 1
            bad = left + 1 >= n or self.tree[i] != node_hash(self.tree[left], self.tree[left + 1], h)
            if left < n and bad:
                raise ValueError(f"Merkle tree node {i} does not hash its children")
        for v, i in zip(self.values, self.tree_indices, strict=True):
            if 2 * i + 1 < n or self.tree[i] != leaf_hash(self.types, v, h):
                raise ValueError(f"value at tree index {i} does not match its leaf")
