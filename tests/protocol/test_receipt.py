"""The receipt's one home: the leaf the settlement worker ships is the leaf @openzeppelin/merkle-tree
computes and the leaf OpenZeppelin's MerkleProof verifies on chain; its JSON and row forms read back."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from typing import Any

import pytest
import solcx
from web3 import Web3

from node.chain.anvil import Anvil
from node.errors import BadRequest
from node.protocol.eip712 import Domain
from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES, Receipt, SignedReceipt, adapter_id_bytes, recover_receipt_signer
from node.protocol.voucher import SignedVoucher
from node.settlement.epoch_builder import EpochBuild, EpochReceipt, build_epoch
from node.settlement.split import Lineage, SplitParams
from node.toolchain import REPO_ROOT, node_script_env, solc_binary

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
NODE = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"  # KEY's address
DOMAIN = Domain(31337, "0x" + "99" * 20)
PARAMS = SplitParams("0x" + "11" * 20, NODE, 500, 1_500)
LINEAGES = {a: Lineage("0x" + "33" * 20, 2_000, (("0x" + "44" * 20, 10_000),)) for a in (1, 2, 3)}

# The contract side: Solidity's own abi.encode of the Receipt struct's fields, hashed as OpenZeppelin's
# StandardMerkleTree does, verified with OpenZeppelin's MerkleProof (the library Settlement uses).
PROBE = """// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
contract ReceiptLeafProbe {
    struct Receipt { bytes32 voucherHash; bytes32 adapterId; uint64 registryBlock; bytes32 lineageHash;
        uint32 promptTokens; uint32 completionTokens; uint256 fee; bytes32 outputHash; uint32 method; }
    function leaf(Receipt calldata r) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(r.voucherHash, r.adapterId, r.registryBlock,
            r.lineageHash, r.promptTokens, r.completionTokens, r.fee, r.outputHash, r.method))));
    }
    function verify(bytes32[] calldata proof, bytes32 root, Receipt calldata r) external pure returns (bool) {
        return MerkleProof.verifyCalldata(proof, root, leaf(r));
    }
}
"""

# The npm library's tree over the same leaf values: root, and each value's leaf hash and proof.
NPM_TREE = """
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');
const { types, values } = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const tree = StandardMerkleTree.of(values, types);
const out = { root: tree.root, leaves: values.map((v) => tree.leafHash(v)),
              proofs: values.map((v) => tree.getProof(v)) };
process.stdout.write(JSON.stringify(out));
"""


def _receipt(rng: random.Random) -> Receipt:
    return Receipt(rng.randbytes(32), adapter_id_bytes(rng.randrange(1, 4)), rng.getrandbits(64), rng.randbytes(32),
                   rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(128), rng.randbytes(32), 1)


def _shipped_epoch(n: int, seed: int = 11) -> tuple[list[EpochReceipt], EpochBuild]:
    """An epoch built the way the settlement worker builds it (build_epoch over EpochReceipts)."""
    rng = random.Random(seed)
    receipts = []
    for i in range(n):
        receipt = _receipt(rng)
        voucher = SignedVoucher("0x" + "66" * 20, NODE, i % 3, 2**200, b"\xab" * 32, 2**40, b"\xcd" * 65)
        receipts.append(EpochReceipt(i + 1, receipt, voucher))
    return receipts, build_epoch(receipts, LINEAGES, PARAMS, {}, 0)


def _npm_tree(values: list[list[Any]]) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "node (npm's runtime) is needed for this test"
    # the npm library takes big integers as decimal strings
    jsonable = [[str(v) if isinstance(v, int) else v for v in value] for value in values]
    done = subprocess.run([node, "-e", NPM_TREE], input=json.dumps({"types": list(LEAF_TYPES), "values": jsonable}),
                          capture_output=True, text=True, env=node_script_env(), cwd=REPO_ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_shipped_receipts_tree_is_the_npm_librarys() -> None:
    receipts, build = _shipped_epoch(9)
    theirs = _npm_tree([r.receipt.leaf() for r in receipts])
    assert to_hex(build.receipts.root) == theirs["root"]
    by_value = {tuple(v): i for i, v in enumerate(build.receipts.values)}
    for r, leaf_hash, proof in zip(receipts, theirs["leaves"], theirs["proofs"], strict=True):
        i = by_value[tuple(r.receipt.leaf())]
        assert to_hex(build.receipts.leaf(i)) == leaf_hash
        assert [to_hex(p) for p in build.receipts.proof(i)] == proof


def _probe(anvil: Anvil) -> Any:
    request = {"language": "Solidity", "sources": {"ReceiptLeafProbe.sol": {"content": PROBE}},
               "settings": {"evmVersion": "cancun",
                            "remappings": ["@openzeppelin/contracts/=node_modules/@openzeppelin/contracts/"],
                            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}}}}
    out = solcx.compile_standard(request, base_path=str(REPO_ROOT), allow_paths=[str(REPO_ROOT)],
                                 solc_binary=solc_binary())
    built = out["contracts"]["ReceiptLeafProbe.sol"]["ReceiptLeafProbe"]
    w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
    deployer = w3.eth.account.from_key(anvil.keys[0])
    factory = w3.eth.contract(abi=built["abi"], bytecode="0x" + built["evm"]["bytecode"]["object"])
    tx = factory.constructor().build_transaction({"from": deployer.address, "nonce": w3.eth.get_transaction_count(
        deployer.address)})
    sent = w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction)
    address = w3.eth.wait_for_transaction_receipt(sent)["contractAddress"]
    return w3.eth.contract(address=address, abi=built["abi"])


@pytest.mark.chain
def test_the_contract_verifies_every_shipped_leaf_and_no_altered_one(anvil: Anvil) -> None:
    receipts, build = _shipped_epoch(7)
    probe = _probe(anvil)
    by_value = {tuple(v): i for i, v in enumerate(build.receipts.values)}
    for r in receipts:
        i = by_value[tuple(r.receipt.leaf())]
        fields = r.receipt.values()
        assert probe.functions.leaf(fields).call() == build.receipts.leaf(i)
        assert probe.functions.verify(build.receipts.proof(i), build.receipts.root, fields).call()
        altered = (*fields[:6], fields[6] + 1, *fields[7:])  # one more wei of fee
        assert not probe.functions.verify(build.receipts.proof(i), build.receipts.root, altered).call()


def test_a_signed_receipt_reads_back_from_its_response_json_and_its_row() -> None:
    receipt = _receipt(random.Random(3))
    signed = SignedReceipt.sign(receipt, KEY, NODE, DOMAIN)
    body = signed.response_json(charged_total=12_345)
    assert body["chargedTotal"] == "12345" and body["fee"] == str(receipt.fee) and body["node"] == NODE
    back = SignedReceipt.from_json(json.loads(json.dumps(body)))
    assert back == signed
    assert recover_receipt_signer(back.receipt, DOMAIN, back.signature) == NODE

    class Row:
        pass

    row = Row()
    row.__dict__.update({**signed.columns(), "voucher_hash": to_hex(receipt.voucher_hash)})
    assert SignedReceipt.from_row(row, NODE) == signed  # type: ignore[arg-type]


def test_a_malformed_receipt_is_refused_naming_the_field() -> None:
    body = SignedReceipt.sign(_receipt(random.Random(4)), KEY, NODE, DOMAIN).to_json()
    with pytest.raises(BadRequest) as short:
        SignedReceipt.from_json({**body, "outputHash": "0x1234"})
    assert short.value.facts["field"] == "outputHash"
    with pytest.raises(BadRequest):
        SignedReceipt.from_json({k: v for k, v in body.items() if k != "fee"})


def test_the_documented_response_schema_is_the_receipts_json() -> None:
    """The OpenAPI schema of a response's `receipt` (api/schemas.py) names exactly the fields it carries."""
    from node.api.schemas import SignedReceipt as ReceiptSchema

    body = SignedReceipt.sign(_receipt(random.Random(5)), KEY, NODE, DOMAIN).response_json(charged_total=7)
    assert set(ReceiptSchema.model_fields) == set(body)
    assert ReceiptSchema.model_validate(body).model_dump() == body


def test_the_output_a_receipt_covers_is_the_text_or_the_json_array_of_the_choices() -> None:
    from node.protocol.receipt import output_text, response_output_text

    assert output_text(["the sea"]) == "the sea"
    assert output_text(["a", "é\"b"]) == '["a","é\\"b"]'
    chat = {"choices": [{"index": 0, "message": {"content": "a"}}, {"index": 1, "message": {"content": "b"}}]}
    assert response_output_text(chat) == '["a","b"]'
    assert response_output_text({"choices": [{"index": 0, "text": "x"}]}) == "x"
    assert response_output_text({"choices": [{"index": 0, "message": {"content": None}}]}) is None
