"""Every `loranode` command as a user runs it, on a real anvil; and the error a bad argument gets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.chain.anvil import Anvil
from node.cli import app
from node.devkit.corpus import STYLES
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
runner = CliRunner()
THAW_PERIOD_S = 3_600  # above the node's epoch max age plus its worst-case settle latency, as deploy requires


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Anvil, dict[str, str]]]:
    out = tmp_path_factory.mktemp("deployments")
    with Anvil() as chain:
        result = runner.invoke(app, ["chain", "deploy", "--rpc-url", chain.rpc_url, "--out", str(out),
                                     "--dev-account", "0", "--challenge-period-s", "0", "--thaw-period-s",
                                     str(THAW_PERIOD_S)])
        assert result.exit_code == 0, result.output
        env = {"LORANODE_RPC_URL": chain.rpc_url, "LORANODE_DEPLOYMENT_FILE": str(out / "31337.json")}
        yield chain, env


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_deploy_writes_the_deployment_file(deployed: tuple[Anvil, dict[str, str]]) -> None:
    data = json.loads(Path(deployed[1]["LORANODE_DEPLOYMENT_FILE"]).read_text())
    assert data["chain_id"] == 31337 and data["settlement"].startswith("0x")
    code, out = _run({}, "chain", "deploy", "--rpc-url", "http://127.0.0.1:1")
    assert code == 2 and "no chain answers" in out


def test_model_id_and_make_tiny(tmp_path: Path, tiny_model: Path) -> None:
    code, out = _run({}, "model", "id", str(tiny_model))
    assert code == 0 and out.startswith("0x") and "config.json" in out
    code, out = _run({}, "model", "id", str(tmp_path))
    assert code == 2 and "no config.json" in out
    code, out = _run({}, "model", "make-tiny", str(tmp_path / "m"), "--arch", "gpt2")
    assert code == 2 and "llama, mistral or qwen2" in out
    code, out = _run({}, "model", "make-tiny", str(tmp_path / "q"), "--arch", "qwen2")
    assert code == 0 and (tmp_path / "q" / "config.json").is_file() and "base model id 0x" in out, out


def test_dataset_register_and_show(deployed: tuple[Anvil, dict[str, str]], tmp_path: Path) -> None:
    env = deployed[1]
    data = tmp_path / "sea.txt"
    data.write_text(STYLES["sea"])
    code, out = _run(env, "dataset", "register", str(data), "--dev-account", "3")
    assert code == 0, out
    assert "registered" in out
    dataset_id = out.split("dataset ")[1].split(" ")[0]
    code, out = _run(env, "dataset", "show", dataset_id)
    assert code == 0 and "content_hash: 0x" in out
    code, out = _run(env, "dataset", "register", str(tmp_path / "missing.txt"), "--dev-account", "3")
    assert code == 2 and "no such file" in out
    code, out = _run(env, "dataset", "register", str(data))
    assert code == 2 and "no signing key" in out


def test_adapter_train_then_register(deployed: tuple[Anvil, dict[str, str]], tmp_path: Path,
                                    tiny_model: Path) -> None:
    env = deployed[1]
    ids = []
    for who, style in (("3", "sea"), ("4", "food")):
        path = tmp_path / f"{style}.txt"
        path.write_text(STYLES[style])
        code, out = _run(env, "dataset", "register", str(path), "--dev-account", who)
        assert code == 0, out
        ids.append(out.split("dataset ")[1].split(" ")[0])
    out_dir = tmp_path / "adapter"
    code, out = _run(env, "adapter", "train", "--base", str(tiny_model), "--dataset", ids[0], "--dataset", ids[1],
                     "--out", str(out_dir), "--steps", "2", "--rank", "4")
    assert code == 0, out
    lineage = json.loads((out_dir / "lineage.json").read_text())
    assert sum(lineage["weightsBps"]) == 10_000 and lineage["datasets"] == [int(i) for i in ids]
    code, out = _run(env, "adapter", "register", str(out_dir), "--dev-account", "5", "--owner-share", "1500")
    assert code == 0 and "registered" in out, out
    adapter_id = out.split("adapter ")[1].split(" ")[0]
    code, out = _run(env, "adapter", "show", adapter_id)
    assert code == 0 and "owner_share_bps: 1500" in out and "is_deprecated: False" in out, out
    code, out = _run(env, "adapter", "show", "0")
    assert code == 2
    code, out = _run(env, "adapter", "register", str(tmp_path), "--dev-account", "5")
    assert code == 2 and "lineage.json" in out
    code, out = _run(env, "adapter", "train", "--base", str(tiny_model), "--dataset", "999", "--out",
                     str(tmp_path / "x"))
    assert code == 2 and "UnknownDataset" in out


def test_adapter_train_streams_shows_progress_and_refuses_a_changed_dataset(
        deployed: tuple[Anvil, dict[str, str]], tmp_path: Path, tiny_model: Path) -> None:
    env = deployed[1]
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(STYLES.values()) * 20)
    code, out = _run(env, "dataset", "register", str(data), "--dev-account", "3")
    assert code == 0, out
    dataset_id = out.split("dataset ")[1].split(" ")[0]
    args = ("adapter", "train", "--base", str(tiny_model), "--dataset", dataset_id, "--seq-len", "32",
            "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--checkpoint-every", "2")
    code, out = _run(env, *args, "--out", str(tmp_path / "adapter"))
    assert code == 0, out
    assert "tokens, hash verified" in out and re.search(r"sequences of 32 tokens( \(the last \d+\))?, 3 steps", out)
    assert "step 3/3" in out and "tok/s" in out and "loss" in out and "ETA" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "checkpoint").exists()
    data.write_text(data.read_text().replace("sea", "see"))  # no longer what was registered
    code, out = _run(env, *args, "--out", str(tmp_path / "other"))
    assert code == 2 and "does not match its registered hash" in out, out
    assert not (tmp_path / "other" / "adapter_model.safetensors").exists()


def test_escrow_deposit_thaw_withdraw(deployed: tuple[Anvil, dict[str, str]]) -> None:
    env = deployed[1]
    node = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    code, out = _run(env, "escrow", "deposit", "2.5", "--node", node, "--mint", "--dev-account", "6")
    assert code == 0 and "balance 2.5" in out, out
    code, out = _run(env, "escrow", "thaw", "1", "--node", node, "--dev-account", "6")
    assert code == 0 and "thawing 1" in out, out
    assert re.search(r"thaw ends at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", out), out  # ISO 8601 UTC, as every time
    deployed[0].rpc("evm_increaseTime", THAW_PERIOD_S)
    deployed[0].rpc("evm_mine")
    code, out = _run(env, "escrow", "withdraw", "--node", node, "--dev-account", "6")
    assert code == 0 and "balance 1.5" in out, out
    payer = deployed[0].keys[6]
    from eth_account import Account

    code, out = _run(env, "escrow", "show", "--node", node, "--payer", Account.from_key(payer).address)
    assert code == 0 and "balance 1.5" in out and "thawing 0" in out, out
    code, out = _run(env, "escrow", "deposit", "abc", "--node", node, "--dev-account", "6")
    assert code == 2 and "not an amount" in out
    code, out = _run(env, "escrow", "deposit", "1000", "--node", node, "--dev-account", "7")
    assert code == 2 and "not enough tokens" in out


def test_request_and_status_against_a_live_node(paid_node: PaidNode, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(paid_node.payer_keys[0])
    code, out = _run({}, "request", "the sea", "--model", str(paid_node.adapter_id), "--node-url",
                     paid_node.base_url, "--key-file", str(key_file), "--max-tokens", "4", "--lane", "77")
    assert code == 0, out
    assert "the node, verified" in out
    code, out = _run({}, "request", "x", "--model", "4242", "--node-url", paid_node.base_url, "--key-file",
                     str(key_file))
    assert code == 2 and "404" in out
    code, out = _run({}, "status", "--node-url", paid_node.base_url)
    assert code == 0 and "serving 1 of 1 registered adapter(s)" in out, out
    # the adapter tiers as a table with a row a tier (they were 20 lines of raw metrics), the load on one line
    tiers = {cells[0]: cells[1:] for cells in map(str.split, out.splitlines())
             if cells[:1] in (["device"], ["host"], ["disk"], ["source"])}
    assert len(tiers) == 4 and all(len(row) == 5 for row in tiers.values()), out
    assert ["adapter", "tier", "hits", "misses", "loads", "evictions", "bytes"] in map(str.split, out.splitlines())
    assert "pending settlement " in out and "receipts " in out
    assert any(line.split()[:2] == [str(paid_node.adapter_id), "serving"] for line in out.splitlines() if line.strip())
    code, out = _run({}, "status", "--node-url", "http://127.0.0.1:1")
    assert code == 2 and "no node answers" in out


def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    env = {"LORANODE_DATA_DIR": str(tmp_path / "data")}
    for _ in range(2):
        code, out = _run(env, "db", "upgrade")
        assert code == 0 and "latest schema" in out, out
    bad = {"LORANODE_DATABASE_URL": "postgresql+psycopg://someone:s3cret@127.0.0.1:1/none?connect_timeout=2"}
    code, out = _run(bad, "db", "upgrade")
    assert code == 2 and "cannot use the database" in out and "s3cret" not in out, out
