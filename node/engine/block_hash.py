"""The content address of a full KV block: a hash chain over (adapter, token ids of each block).

A block's keys and values depend on every token before it and on the adapter that computed them, so
its hash is `H(parent hash || its token ids)`, and the chain starts from a root per adapter (the base
model, no adapter, has a root of its own). The same prefix under one adapter always gives the same
chain; under two adapters, two chains that never meet.

The hash is BLAKE2b with a 256-bit digest. The cache is shared by every tenant of a node, so a
collision would hand one request another's keys and values: a hash anyone can collide on purpose
(Python's `hash`, a CRC, a 64-bit digest) would let a crafted prompt read, or poison, another
tenant's context. BLAKE2b is collision resistant and, in CPython's hashlib, faster than SHA-256
(a 16-token block hashes in about a microsecond, far below a step).
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes
DIGEST_SIZE = 32


def chain_root(adapter_id: str | None) -> BlockHash:
    """The hash before a sequence's first block: one namespace per adapter, and one for the base model."""
    label = b"base" if adapter_id is None else b"adapter:" + adapter_id.encode()
    return hashlib.blake2b(label, digest_size=DIGEST_SIZE, person=b"loranode-kvroot").digest()


def block_hash(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    """The hash of a full block holding `token_ids` after the blocks that hashed to `parent`."""
    tokens = array("q", token_ids).tobytes()  # 8 bytes per id: no two id lists give the same bytes
    return hashlib.blake2b(parent + tokens, digest_size=DIGEST_SIZE, person=b"loranode-kvblock").digest()


def extend_chain(hashes: list[BlockHash], adapter_id: str | None, token_ids: list[int], block_size: int,
                 num_blocks: int) -> None:
    """Append to `hashes` (the chain of the first len(hashes) blocks of `token_ids`) up to `num_blocks`
    full blocks."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else chain_root(adapter_id)
        hashes.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size]))
