"""Rewards-tree build time: node.settlement.merkle against a plain eth_abi + eth_hash build of the
same StandardMerkleTree, on the same leaves, then the fast build alone at a million leaves.

    python bench/merkle_tree.py [--leaves 1000000] [--baseline-leaves 100000]

Prints a table and writes bench/results/merkle_tree.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from eth_abi import encode
from eth_hash.auto import keccak

from node.settlement.merkle import MerkleTree

TYPES = ["address", "uint256"]
RESULTS = Path(__file__).resolve().parent / "results" / "merkle_tree.json"


def baseline_root(values: list[tuple[str, int]]) -> bytes:
    """The obvious implementation: eth_abi per leaf, a fresh keccak per hash."""
    leaves = sorted(keccak(keccak(encode(TYPES, list(v)))) for v in values)
    n = len(leaves)
    tree: list[bytes] = [b""] * (2 * n - 1)
    tree[n - 1:] = list(reversed(leaves))
    for i in range(n - 2, -1, -1):
        a, b = tree[2 * i + 1], tree[2 * i + 2]
        tree[i] = keccak(a + b if a <= b else b + a)
    return tree[0]


def leaves(n: int, seed: int = 1) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [("0x" + rng.randbytes(20).hex(), rng.getrandbits(96)) for _ in range(n)]


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--baseline-leaves", type=int, default=100_000)
    args = parser.parse_args()
    rows = []
    small = leaves(args.baseline_leaves)
    base_root, base_s = timed(baseline_root, small)
    tree, fast_s = timed(MerkleTree.of, small, TYPES)
    assert tree.root == base_root, "the two builds disagree"
    rows.append({"build": "eth_abi + eth_hash (baseline)", "leaves": len(small), "seconds": base_s,
                 "ratio": 1.0})
    rows.append({"build": "node.settlement.merkle", "leaves": len(small), "seconds": fast_s,
                 "ratio": base_s / fast_s})
    big = leaves(args.leaves, seed=2)
    big_tree, big_s = timed(MerkleTree.of, big, TYPES)
    _, proof_s = timed(lambda: [big_tree.proof(i) for i in range(1000)])
    rows.append({"build": "node.settlement.merkle", "leaves": len(big), "seconds": big_s, "ratio": None})
    print(f"{'build':<32} {'leaves':>10} {'seconds':>9} {'speed-up':>9}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"{r['build']:<32} {r['leaves']:>10,} {r['seconds']:>9.2f} {ratio:>9}")
    print(f"1,000 proofs from the {len(big):,}-leaf tree: {proof_s * 1000:.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "proofs_1000_s": proof_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
