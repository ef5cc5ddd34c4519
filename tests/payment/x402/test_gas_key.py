"""Nobody can make the node stop paying everyone: the transactions the API sends for x402 payers (their
deposits, gasless for them) go out from a gas key of their own, never the operator key whose nonces the
settlement worker's settles take (docs/x402.md, "Keys").

The attack: any x402 payer makes the node send a deposit. Sent from the operator key, a deposit that
never mines (dropped from the mempool, or stuck at a fee no block takes: the API never bumps it) holds
the operator's next nonce, and the worker's settle signed after it waits behind it forever."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3

from node.api.wiring import _x402
from node.chain.tx_manager import FeePolicy, TxManager, TxState
from node.chain.tx_store import SqlTxStore
from node.config import Settings, load_settings
from node.db.session import make_engine, session_factory, upgrade
from node.errors import ConfigError
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService
from node.protocol.eip712 import Domain
from tests.fixtures.contracts import Roles
from tests.payment.x402.conftest import X402World
from tests.payment.x402.sdk import Payer

pytestmark = pytest.mark.chain


def _api_x402(tmp_path: Path, world: X402World, roles: Roles, **settings: Any) -> Any:
    """The API's x402 service, wired from Settings as `loranode api` wires it."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    factory = session_factory(make_engine(url))
    node = world.terms.authorizer
    payments = PaymentService(Ledger(factory, node), Domain(world.dep.chain_id, world.dep.settlement), node,
                              Pricing(1, 1, 0))
    config = Settings(data_dir=tmp_path, rpc_url=world.rpc_url, operator_key=roles.node,
                      x402_router=world.terms.router, **settings)
    _, x402 = _x402(config, world.dep, roles.node, payments, factory)
    assert x402 is not None
    return x402, factory


def _pending_hashes(w3: Web3) -> list[str]:
    block = w3.eth.get_block("pending", full_transactions=True)
    return [tx["hash"].to_0x_hex() for tx in block["transactions"]]


def test_a_deposit_that_never_mines_does_not_hold_up_the_workers_settle(tmp_path: Path, x402_world: X402World,
                                                                         roles: Roles) -> None:
    x402, factory = _api_x402(tmp_path, x402_world, roles)
    w3 = Web3(Web3.HTTPProvider(x402_world.rpc_url))
    operator = Roles.address(roles.node)
    worker = TxManager(w3, roles.node, SqlTxStore(factory), FeePolicy(confirmations=1, bump_after_s=3600))
    _, payment = Payer(roles.payer, x402_world.rpc_url, x402_world.dep.chain_id).pay(x402_world.required())
    provider = w3.provider
    provider.make_request("evm_setAutomine", [False])
    deposit = threading.Thread(target=lambda: x402.submit_deposit(payment), daemon=True)
    raw = None
    try:
        deposit.start()  # a payer's deposit: the API submits it and waits for its block
        deadline = time.monotonic() + 10
        while not _pending_hashes(w3):
            assert time.monotonic() < deadline, "the deposit never reached the mempool"
            time.sleep(0.05)
        (tx_hash,) = _pending_hashes(w3)
        raw = provider.make_request("eth_getRawTransactionByHash", [tx_hash])["result"]
        # the worker's settle (any intent of the operator key) while the deposit is pending
        record = worker.send("settle:attack:1", operator, "0x")
        provider.make_request("anvil_dropTransaction", [tx_hash])  # and the deposit never mines
        provider.make_request("evm_mine", [])
        record = worker.poll("settle:attack:1")
        assert record.state is not TxState.PENDING, (
            f"the settle (nonce {record.nonce}) waits behind the API's deposit, sent from the operator key")
        assert Account.recover_transaction(raw) != operator, "the API's deposit came from the operator key"
    finally:
        if raw is not None:  # let the API's deposit land so its thread ends
            provider.make_request("eth_sendRawTransaction", [raw])
        provider.make_request("evm_setAutomine", [True])
        provider.make_request("evm_mine", [])
        deposit.join(timeout=30)
    assert x402_world.chain.channel(payment.voucher.channel_id).balance == payment.deposit.amount


def test_the_gas_key_may_not_be_the_operator_key(tmp_path: Path, roles: Roles) -> None:
    with pytest.raises(ConfigError, match="x402_gas_key must not be the operator key"):
        load_settings(data_dir=tmp_path, operator_key=roles.node, x402_gas_key=roles.node)
    key_file = tmp_path / "gas_key"
    key_file.write_text(roles.node.upper().replace("0X", "0x") + "\n")
    with pytest.raises(ConfigError, match="x402_gas_key must not be the operator key"):
        load_settings(data_dir=tmp_path, operator_key=roles.node, x402_gas_key_file=key_file)
    dev = load_settings(data_dir=tmp_path)
    assert dev.resolved_x402_gas_key() not in (None, dev.resolved_operator_key()), "the dev default is its own key"


def test_the_public_dev_gas_key_is_refused_off_the_dev_chain(tmp_path: Path, roles: Roles) -> None:
    dev_gas = load_settings(data_dir=tmp_path).resolved_x402_gas_key()
    with pytest.raises(ConfigError, match="public development key"):
        load_settings(data_dir=tmp_path, chain_id=8453, rpc_url="http://127.0.0.1:9", operator_key=roles.node,
                      x402_gas_key=dev_gas)
    prod = load_settings(data_dir=tmp_path, chain_id=8453, rpc_url="http://127.0.0.1:9", operator_key=roles.node)
    assert prod.resolved_x402_gas_key() is None, "off the dev chain there is no default gas key"
