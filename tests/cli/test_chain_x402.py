"""`loranode chain deploy` deploys the x402 contracts where they are absent (on anvil: our code set at the
canonical addresses the SDKs expect) and the node's router; `loranode chain x402` adds them to an older
deployment; the node's API, worker and indexer pick them up from the deployment file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from node.api.wiring import _x402
from node.chain.anvil import Anvil
from node.chain.binding import IndexedContracts
from node.chain.contract_client import ContractClient
from node.chain.deploy import read_deployment
from node.chain.events import Role
from node.cli.app import app
from node.config import load_settings
from node.db.session import make_engine, session_factory, upgrade
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService
from node.payment.x402.typed import CHANNELS_ADDRESS, ERC3009_COLLECTOR_ADDRESS
from node.protocol.eip712 import Domain

pytestmark = pytest.mark.chain
runner = CliRunner()


def _deploy(chain: Anvil, out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["chain", "deploy", "--rpc-url", chain.rpc_url, "--out", str(out), "--dev-account",
                                 "0", "--challenge-period-s", "0", "--thaw-period-s", "3600", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "31337.json").read_text())


def test_deploy_sets_the_channel_contracts_and_a_router_for_the_node(tmp_path: Path) -> None:
    with Anvil() as chain:
        node = Account.from_key(chain.keys[4]).address
        dep = _deploy(chain, tmp_path, "--node", node)
        client = ContractClient(chain.rpc_url, chain.keys[4])
        assert (dep["x402_channels"], dep["x402_collector"]) == (CHANNELS_ADDRESS, ERC3009_COLLECTOR_ADDRESS)
        assert client.w3.eth.get_code(CHANNELS_ADDRESS) and client.w3.eth.get_code(ERC3009_COLLECTOR_ADDRESS)
        router = client.contract("X402Router", dep["x402_router"])
        assert client.call(router.functions.node()) == node
        assert client.call(router.functions.escrow()) == dep["escrow"]
        collector = client.contract("ERC3009Collector", ERC3009_COLLECTOR_ADDRESS)
        assert client.call(collector.functions.channels()) == CHANNELS_ADDRESS, "it serves the canonical contract"


def test_chain_x402_completes_an_older_deployment_once(tmp_path: Path) -> None:
    with Anvil() as chain:
        dep = _deploy(chain, tmp_path, "--no-x402")
        assert dep["x402_router"] is None and not ContractClient(chain.rpc_url).w3.eth.get_code(CHANNELS_ADDRESS)
        args = ["chain", "x402", "--rpc-url", chain.rpc_url, "--deployment", str(tmp_path / "31337.json"),
                "--dev-account", "0"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0 and "router 0x" in first.output, first.output
        router = json.loads((tmp_path / "31337.json").read_text())["x402_router"]
        again = runner.invoke(app, args)
        assert again.exit_code == 0 and json.loads((tmp_path / "31337.json").read_text())["x402_router"] == router
        elsewhere = runner.invoke(app, ["chain", "x402", "--rpc-url", "http://127.0.0.1:1", "--deployment",
                                        str(tmp_path / "31337.json"), "--dev-account", "0"])
        assert elsewhere.exit_code == 2 and "no chain answers" in elsewhere.output


def test_the_node_picks_the_x402_contracts_up_from_the_deployment(tmp_path: Path) -> None:
    with Anvil() as chain:
        _deploy(chain, tmp_path)
        dep = read_deployment(tmp_path / "31337.json")
        assert IndexedContracts.from_deployment(dep).roles()[CHANNELS_ADDRESS.lower()] is Role.X402_CHANNELS
        settings = load_settings(rpc_url=chain.rpc_url, data_dir=tmp_path, x402_router=None)
        db_url = f"sqlite:///{tmp_path / 'node.db'}"
        upgrade(db_url)
        factory = session_factory(make_engine(db_url))
        node = Account.from_key(chain.keys[0]).address
        payments = PaymentService(Ledger(factory, node), Domain(dep.chain_id, dep.settlement), node, Pricing(1, 1))
        offer, x402 = _x402(settings, dep, chain.keys[0], payments, factory)
        assert offer.x402 is not None and x402 is not None
        assert x402.terms.router == dep.x402_router and x402.read_mirror is not None, "the hold reads the mirror"
