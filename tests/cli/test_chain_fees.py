"""A command that sends transactions (`loranode claim`, `escrow`, `adapter register`...) prices and replaces
them with the node's settings, as the node's own processes do, not with built-in defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.chain.anvil import Anvil
from node.chain.deploy import Deployment, write_deployment
from node.cli.context import chain_context

pytestmark = pytest.mark.chain

ADDRESS = "0x" + "11" * 20


def test_a_commands_contracts_use_the_nodes_fee_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = Deployment(chain_id=31337, token=ADDRESS, dataset_registry=ADDRESS, adapter_registry=ADDRESS, escrow=ADDRESS,
                     settlement=ADDRESS, deployer=ADDRESS, guardian=ADDRESS, treasury=ADDRESS, protocol_bps=500,
                     node_bps=1_500, thaw_period_s=3_600, challenge_period_s=0, from_block=0)
    monkeypatch.setenv("LORANODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORANODE_DEPLOYMENT_FILE", str(write_deployment(dep, tmp_path / "deployments")))
    monkeypatch.setenv("LORANODE_MAX_FEE_PER_GAS", str(7 * 10**9))
    monkeypatch.setenv("LORANODE_FEE_BUMP_AFTER_S", "3")
    anvil = Anvil().start()
    try:
        contracts = chain_context(anvil.rpc_url, None).contracts(anvil.keys[1])
        for client in (contracts.client, contracts.as_signer(anvil.keys[2]).client):
            assert client.fees.max_fee_cap == 7 * 10**9
            assert client.fees.bump_after_s == 3
    finally:
        anvil.stop()
