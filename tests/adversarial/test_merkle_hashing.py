"""An epoch's trees are built whatever the installed libraries do: the fast keccak (pycryptodome's C
state, called through its raw API) is used only when it hashes exactly as keccak256, and any failure to
set it up falls back to keccak256 instead of stopping settlement. (Installing `cffi` switched
pycryptodome's raw API from ctypes to cffi, and every tree build raised TypeError: no epoch could be
settled, nobody paid.)"""

from __future__ import annotations

import os

from eth_utils import keccak

from node.settlement.merkle import MerkleTree, hasher

ADDRESSES = ["0x" + f"{i:040x}" for i in range(1, 6)]


def test_the_tree_hasher_hashes_as_keccak256_with_the_installed_libraries() -> None:
    h = hasher()
    for data in (b"", b"\x00", os.urandom(64), os.urandom(1_000), b"x" * 136, b"y" * 137):
        assert h(data) == keccak(data)


def test_a_rewards_tree_builds_and_proves_each_leaf() -> None:
    types, values = ["address", "uint256"], [[a, 10**18 + i] for i, a in enumerate(ADDRESSES)]
    tree = MerkleTree.of(values, types)
    for i, value in enumerate(values):
        assert MerkleTree.verify(tree.root, types, value, tree.proof(i))
