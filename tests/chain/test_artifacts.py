"""Contract artifacts: compiled once per source hash and read back from the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

from node.chain.artifacts import CONTRACT_NAMES, load_artifacts, source_hash
from node.toolchain import REPO_ROOT


def test_every_contract_has_abi_and_bytecode_cached_by_source_hash() -> None:
    artifacts = load_artifacts()
    assert set(CONTRACT_NAMES) <= set(artifacts)
    settle = [f for f in artifacts["Settlement"].abi if f.get("name") == "settle"]
    assert len(settle) == 1 and len(settle[0]["inputs"]) == 7
    assert all(len(a.bytecode) > 1000 and len(a.deployed_bytecode) > 1000 for a in artifacts.values())
    assert (REPO_ROOT / "build" / "contracts" / f"{source_hash()}.json").exists()


def test_source_hash_changes_with_any_source(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "contracts" / "src", tmp_path / "contracts" / "src")
    (tmp_path / "node_modules").symlink_to(REPO_ROOT / "node_modules")
    assert source_hash(tmp_path) == source_hash()
    escrow = tmp_path / "contracts" / "src" / "PaymentEscrow.sol"
    escrow.write_text(escrow.read_text() + "\n// a comment is a new build\n")
    assert source_hash(tmp_path) != source_hash()
