"""One payee the token refuses to pay (a USDC-style blocklist) must not stop a relayer paying the
others. Real anvil, real contracts: the token's code is swapped for a blocklisting one.

The attack without this: `claim_all` sent `claimMany` for up to 100 payees in one transaction, so one
blocked payout address (blocked by the token's issuer, or chosen on purpose by a contributor) reverted
the whole batch: nobody in it was paid and the CLI stopped there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.chain.anvil import Anvil
from node.db.models import EpochState
from node.settlement.claims import claim_all
from node.settlement.publication import export_epoch
from tests.adversarial.settlement_steps import tick_until
from tests.fixtures.blocklist import block_transfers
from tests.fixtures.settlement import OPERATOR, RELAYER, SettlementWorld, build_world

pytestmark = pytest.mark.chain


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettlementWorld]:
    """One chain, contracts and database for the module: each test pays, closes and claims an epoch of its own."""
    with Anvil() as chain:
        yield build_world(chain, f"sqlite:///{tmp_path_factory.mktemp('blocklist') / 'settle.db'}")


def _one_epoch(world: SettlementWorld, folder: Path) -> tuple[Path, Counter[str]]:
    """Two paid requests in a new epoch, final and exported; and what each payee is owed for it."""
    service = world.service()
    owed_before = world.expected_split()
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000_003)
    world.pay(1, 0, b, 2_000_011)
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    tick_until(world, service, epoch_id, EpochState.FINAL)
    return export_epoch(world.factory, world.node, folder / "epoch.json"), world.expected_split() - owed_before


@contextmanager
def _blocked(world: SettlementWorld, account: str) -> Iterator[None]:
    """The token refuses transfers to and from `account` inside the block (and never past it)."""
    token = world.contracts(OPERATOR).token.address
    block_transfers(world.anvil, token, account)
    try:
        yield
    finally:
        block_transfers(world.anvil, token, account, is_blocked=False)


def test_a_blocked_payee_is_reported_and_every_other_payee_is_paid(world: SettlementWorld, tmp_path: Path) -> None:
    export, expected = _one_epoch(world, tmp_path)
    token = world.contracts(OPERATOR).token
    blocked = world.lineages[world.adapter_ids[0]].datasets[0][0]  # a contributor
    assert len(expected) > 2 and blocked in expected
    before = {a: token.balance_of(a) for a in expected}

    with _blocked(world, blocked):
        outcome = claim_all(world.contracts(RELAYER), world.node, export)

    others = {a: v for a, v in expected.items() if a != blocked}
    assert outcome.paid == others, "every payee but the blocked one is paid in full"
    assert {a: token.balance_of(a) - before[a] for a in expected} == {**others, blocked: 0}
    assert list(outcome.refused) == [blocked], "the blocked payee is named, not silently skipped"
    assert "claimMany" in outcome.refused[blocked]

    later = claim_all(world.contracts(RELAYER), world.node, export)
    assert later.paid == {blocked: expected[blocked]} and not later.refused, "nothing was lost meanwhile"
    assert token.balance_of(world.contracts(OPERATOR).settlement.address) == 0


def test_claim_all_from_the_cli_pays_the_others_and_names_the_blocked_payee(world: SettlementWorld,
                                                                          tmp_path: Path) -> None:
    from node.chain.deploy import write_deployment
    from node.cli import app

    export, expected = _one_epoch(world, tmp_path)
    token = world.contracts(OPERATOR).token
    blocked = world.lineages[world.adapter_ids[1]].owner  # an adapter owner, this time
    before = {a: token.balance_of(a) for a in expected}
    env = {"LORANODE_RPC_URL": world.anvil.rpc_url,
           "LORANODE_DEPLOYMENT_FILE": str(write_deployment(world.deployment, tmp_path / "deployments"))}
    with _blocked(world, blocked):
        result = CliRunner().invoke(app, ["claim", "--node", world.node, "--proofs", str(export), "--all",
                                          "--dev-account", str(RELAYER)], env=env)
    assert result.exit_code != 0, result.output
    assert f"{len(expected) - 1} payee(s) paid" in result.output and blocked in result.output
    assert token.balance_of(blocked) == before[blocked]
    others = {a: v for a, v in expected.items() if a != blocked}
    assert {a: token.balance_of(a) - before[a] for a in others} == others, "every other payee holds exactly its share"
