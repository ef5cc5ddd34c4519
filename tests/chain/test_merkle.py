"""The Python Merkle tree against @openzeppelin/merkle-tree itself (run with node on the same leaves)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from typing import Any

import pytest

from node.protocol.receipt import LEAF_TYPES, Receipt
from node.settlement.merkle import MerkleTree, json_value
from node.toolchain import REPO_ROOT, node_script_env

# Builds each tree with the npm library; prints root, every proof, and the dump.
NPM_TREES = """
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');
const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const out = cases.map(({ types, values }) => {
  const tree = StandardMerkleTree.of(values, types);
  return { root: tree.root, proofs: values.map((_, i) => tree.getProof(i)), dump: tree.dump() };
});
process.stdout.write(JSON.stringify(out));
"""


def _npm_trees(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node (npm's runtime) is needed for this test"
    done = subprocess.run([node, "-e", NPM_TREES], input=json.dumps(cases), capture_output=True, text=True,
                          env=node_script_env(), cwd=REPO_ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def _address(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


def _rewards(rng: random.Random, n: int) -> list[tuple[str, int]]:
    return [(_address(rng), rng.choice([0, 1, rng.getrandbits(64), rng.getrandbits(256)])) for _ in range(n)]


def _receipts(rng: random.Random, n: int) -> list[list[Any]]:
    """Random receipts' leaves, as the settlement worker ships them (`Receipt.leaf()`)."""
    return [Receipt(rng.randbytes(32), rng.randbytes(32), rng.getrandbits(64), rng.randbytes(32), rng.getrandbits(32),
                    rng.getrandbits(32), rng.getrandbits(256), rng.randbytes(32), rng.getrandbits(32)).leaf()
            for _ in range(n)]


def _dynamic(rng: random.Random, n: int) -> list[list[Any]]:
    return [[rng.choice(["", "ünïcode", "x" * 40]), [rng.getrandbits(256) for _ in range(rng.randrange(3))],
             rng.randbytes(rng.randrange(70)), rng.random() < 0.5] for _ in range(n)]


def test_root_proofs_and_dump_equal_the_npm_library() -> None:
    rng = random.Random(7)
    cases: list[tuple[list[str], list[Any]]] = [(["address", "uint256"], _rewards(rng, n))
                                                 for n in (1, 2, 3, 4, 5, 7, 8, 9, 33, 100, 257)]
    cases += [(list(LEAF_TYPES), _receipts(rng, n)) for n in (1, 6, 31)]
    cases += [(["string", "uint256[]", "bytes", "bool"], _dynamic(rng, n)) for n in (1, 5, 12)]
    npm = _npm_trees([{"types": t, "values": json_value([list(v) for v in vs])} for t, vs in cases])
    for (types, values), theirs in zip(cases, npm, strict=True):
        ours = MerkleTree.of(values, types)
        assert "0x" + ours.root.hex() == theirs["root"], (types, len(values))
        assert [["0x" + h.hex() for h in ours.proof(i)] for i in range(len(values))] == theirs["proofs"]
        assert ours.to_json() == theirs["dump"]
        for i, value in enumerate(values):
            assert MerkleTree.verify(ours.root, types, value, ours.proof(i))


def test_loads_the_npm_dump_and_refuses_a_tampered_one() -> None:
    values = _rewards(random.Random(3), 20)
    case = {"types": ["address", "uint256"], "values": json_value([list(v) for v in values])}
    [theirs] = _npm_trees([case])
    loaded = MerkleTree.load(theirs["dump"])
    assert "0x" + loaded.root.hex() == theirs["root"]
    assert loaded.proof(4) == MerkleTree.of(values, ["address", "uint256"]).proof(4)
    theirs["dump"]["values"][4]["value"][1] = str(int(theirs["dump"]["values"][4]["value"][1]) + 1)
    with pytest.raises(ValueError, match="does not match its leaf"):
        MerkleTree.load(theirs["dump"])


def test_a_proof_does_not_verify_another_amount() -> None:
    values = _rewards(random.Random(5), 10)
    tree = MerkleTree.of(values, ["address", "uint256"])
    account, amount = values[3]
    assert not MerkleTree.verify(tree.root, ["address", "uint256"], (account, amount + 1), tree.proof(3))
    assert not MerkleTree.verify(tree.root, ["address", "uint256"], (account, amount), tree.proof(4))


def test_refuses_an_empty_tree_and_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        MerkleTree.of([], ["address", "uint256"])
    with pytest.raises(ValueError, match="out of range"):
        MerkleTree.of([("0x" + "11" * 20, 1 << 256)], ["address", "uint256"])
    with pytest.raises(ValueError, match="out of range"):
        MerkleTree.of([(256,)], ["uint8"])
