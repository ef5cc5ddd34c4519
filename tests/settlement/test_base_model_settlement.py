"""A base-model request's money end to end: paid through the live API (receipt with adapter id 0 and the
empty lineage), settled on the local anvil chain by the worker, and claimed: the treasury gets the
protocol's share and the node exactly the rest, to the wei; nobody else is a payee."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from node.client.payer import Payer
from node.db.models import EpochState
from node.settlement.claims import claim, load_rewards
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from tests.api.test_models import BASE_COMPLETION_PRICE, BASE_PROMPT_PRICE, base_node
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
PROTOCOL_BPS = 500  # LocalNode.start_chain's default


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    yield from base_node(tiny_model, tiny_adapters, tmp_path_factory)


def test_base_model_fees_settle_and_the_node_claims_exactly_its_fee(node: PaidNode) -> None:
    local = node.local
    outs = [Payer(key, node.base_url).openai(lane=lane).completions.create(model="tiny-base", prompt=p, max_tokens=4)
            for key, lane, p in ((node.payer_keys[0], 0, "the sea"), (node.payer_keys[1], 7, "calm and blue"))]
    fees = [int(o.model_extra["receipt"]["fee"]) for o in outs]
    for out, fee in zip(outs, fees, strict=True):
        assert fee == BASE_PROMPT_PRICE * out.usage.prompt_tokens + BASE_COMPLETION_PRICE * out.usage.completion_tokens
    service = SettlementRuntime.from_settings(local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()
    epoch_id = service.close_epoch()
    assert epoch_id == 1 and service.run_until_final(epoch_id, timeout_s=60) is EpochState.FINAL

    ops = local.contracts(0)
    operator, treasury = ops.client.address, local.deployment.treasury
    assert ops.settlement.rewards_total(operator) == sum(fees)
    protocol = sum(f * PROTOCOL_BPS // 10_000 for f in fees)
    payees = {to_checksum_address(v[0]) for v in load_rewards(ops, operator, node.base_url).tree.values}
    assert payees == {operator, treasury}
    before = ops.token.balance_of(operator)
    assert claim(ops, operator, operator, node.base_url) == sum(fees) - protocol
    assert ops.token.balance_of(operator) - before == sum(fees) - protocol
    assert claim(ops, operator, treasury, node.base_url) == protocol
