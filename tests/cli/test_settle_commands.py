"""`loranode epoch export`, `loranode claim` (one payee and relayer mode), and the process commands'
errors when a node is not set up yet."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.chain.deploy import write_deployment
from node.cli import app
from tests.fixtures.settlement import CONTRIBUTORS, PAYERS, RELAYER, SettlementWorld
from tests.settlement.test_publication import settle_now

pytestmark = pytest.mark.chain
runner = CliRunner()


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_export_then_claim_from_the_file(sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    world = sqlite_world
    for lane in range(2):
        world.pay(0, lane, world.adapter_ids[0], 10**15)
    world.pay(1, 0, world.adapter_ids[1], 3 * 10**15)
    settle_now(world, world.service())
    env = {"LORANODE_DATABASE_URL": world.db_url, "LORANODE_RPC_URL": world.anvil.rpc_url,
           "LORANODE_DEPLOYMENT_FILE": str(write_deployment(world.deployment, tmp_path / "deployments"))}
    export = tmp_path / "epoch.json"
    code, out = _run(env, "epoch", "export", "--node", world.node, "--out", str(export))
    assert code == 0 and export.is_file(), out

    contributor = world.contracts(CONTRIBUTORS[0]).client.address
    expected = world.expected_split()[contributor]
    code, out = _run(env, "claim", "--node", world.node, "--proofs", str(export), "--dev-account",
                     str(CONTRIBUTORS[0]))
    assert code == 0 and f"{contributor} received" in out, out
    assert world.contracts(CONTRIBUTORS[0]).token.balance_of(contributor) == expected
    code, out = _run(env, "claim", "--node", world.node, "--proofs", str(export), "--dev-account",
                     str(CONTRIBUTORS[0]))
    assert code == 0 and "nothing due" in out

    code, out = _run(env, "claim", "--node", world.node, "--proofs", str(export), "--all", "--dev-account",
                     str(RELAYER))
    assert code == 0 and "payee(s) paid" in out, out
    assert world.contracts(0).settlement.paid_out(world.node) == sum(world.expected_split().values())

    code, out = _run(env, "claim", "--node", world.node, "--proofs", str(tmp_path / "nope.json"),
                     "--dev-account", str(PAYERS[0]))
    assert code == 2 and "no epoch file" in out
    code, out = _run(env, "epoch", "export", "--node", world.node, "--out", str(export), "--epoch", "9")
    assert code == 2 and "no published epoch 9" in out


@pytest.mark.parametrize("command", ["api", "indexer", "worker", "beat"])
def test_processes_refuse_to_start_without_a_deployment(command: str, tmp_path: Path) -> None:
    env = {"LORANODE_DATA_DIR": str(tmp_path), "LORANODE_DEPLOYMENT_FILE": str(tmp_path / "missing.json"),
           "LORANODE_RPC_URL": "http://127.0.0.1:1", "LORANODE_MODEL_PATH": str(tmp_path)}
    code, out = _run(env, command)
    assert code == 2 and "deployment" in out, out


def test_settle_losses_shows_every_loss_per_payer_with_its_reason(sqlite_world: SettlementWorld) -> None:
    world = sqlite_world
    a, _ = world.adapter_ids
    world.pay(0, 0, a, 1_000, validity_s=60)  # expires before any settle can land
    world.pay(0, 1, a, 2_000, validity_s=60)
    world.pay(1, 0, a, 4_000, validity_s=60)
    world.pay(2, 0, a, 8_000)  # collected: not a loss
    world.anvil.rpc("evm_increaseTime", 120)
    world.mine()
    settle_now(world, world.service())
    env = {"LORANODE_DATABASE_URL": world.db_url}
    code, out = _run(env, "settle", "losses", "--node", world.node)
    assert code == 0, out
    first, second = (world.contracts(PAYERS[i]).client.address.lower() for i in (0, 1))
    assert f"payer {first}: 3000 lost in 2 record(s)" in out and f"payer {second}: 4000 lost in 1" in out
    assert out.count("voucher_expired") == 3 and "total 7000 lost" in out
    assert world.contracts(PAYERS[2]).client.address.lower() not in out
    code, out = _run(env, "settle", "losses", "--node", world.node, "--payer", second)
    assert code == 0 and first not in out and "total 4000 lost" in out, out
