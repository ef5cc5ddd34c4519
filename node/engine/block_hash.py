"""The content address of a full KV block: a hash chain over (adapter, cache salt, token ids of each block).

A block's keys and values depend on every token before it and on the adapter that computed them, so
its hash is `H(parent hash || its token ids)`, and the chain starts from a root per adapter (the base
model, no adapter, has a root of its own). The same prefix under one adapter always gives the same
chain; under two adapters, two chains that never meet.

A request's optional cache salt (`SamplingParams.cache_salt`, the API's `cache_salt`) is mixed into
its root: requests share blocks only with requests of the same adapter and the same salt. Without
one, every request of an adapter shares its chain, and the time to a first token tells whether a
block of someone else's prompt is cached (docs/security.md); a salt kept secret closes that channel
for the prompts sent under it, at the cost of sharing nothing with requests outside it.

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


def chain_root(adapter_id: str | None, cache_salt: str | None = None) -> BlockHash:
    """The hash before a sequence's first block: one namespace per adapter, and one for the base model;
    within one, a namespace per cache salt (no salt: the adapter's shared one)."""
    label = b"base" if adapter_id is None else b"adapter:" + adapter_id.encode()
    root = hashlib.blake2b(label, digest_size=DIGEST_SIZE, person=b"loranode-kvroot").digest()
    if cache_salt is None:
        return root
    # the unsalted root is of fixed length, so (adapter, salt) pairs never give the same bytes
    salted = root + cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(salted, digest_size=DIGEST_SIZE, person=b"loranode-kvsalt").digest()


def block_hash(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    """The hash of a full block holding `token_ids` after the blocks that hashed to `parent`."""
    tokens = array("q", token_ids).tobytes()  # 8 bytes per id: no two id lists give the same bytes
    return hashlib.blake2b(parent + tokens, digest_size=DIGEST_SIZE, person=b"loranode-kvblock").digest()


def extend_chain(hashes: list[BlockHash], adapter_id: str | None, cache_salt: str | None, token_ids: list[int],
                 block_size: int) -> None:
    """Append to `hashes` the chain of the full blocks of `token_ids`: the tokens after the blocks `hashes`
    holds (a sequence's history is never copied whole to hash its next block)."""
    for i in range(len(token_ids) // block_size):
        parent = hashes[-1] if hashes else chain_root(adapter_id, cache_salt)
        hashes.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size]))
