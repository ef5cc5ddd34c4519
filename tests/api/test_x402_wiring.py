"""The node refuses an x402 withdraw delay its settle latency cannot beat: a payer could withdraw what it
was charged before the node claims it (docs/x402.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.api.wiring import _x402
from node.chain.deploy import Deployment
from node.config import Settings
from node.db.session import make_engine, session_factory, upgrade
from node.errors import ConfigError
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService
from node.protocol.eip712 import Domain

NODE = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def _deployment() -> Deployment:
    a = "0x" + "11" * 20
    return Deployment(chain_id=31337, token=a, dataset_registry=a, adapter_registry=a, escrow=a, settlement=a,
                      deployer=NODE, guardian=a, treasury=a, protocol_bps=500, node_bps=1000, thaw_period_s=3600,
                      challenge_period_s=0, from_block=1)


def test_a_withdraw_delay_shorter_than_the_settle_latency_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    factory = session_factory(make_engine(url))
    payments = PaymentService(Ledger(factory, NODE), Domain(31337, "0x" + "11" * 20), NODE, Pricing(1, 1, 0))
    settings = Settings(data_dir=tmp_path, rpc_url="http://127.0.0.1:9", x402_router="0x" + "22" * 20,
                        x402_withdraw_delay_s=900)
    assert settings.settle_latency().min_thaw_period_s > 900
    with pytest.raises(ConfigError, match="x402_withdraw_delay_s is too short"):
        _x402(settings, _deployment(), KEY, payments, factory)
    offer, x402 = _x402(settings.model_copy(update={"x402_router": None}), _deployment(), KEY, payments, factory)
    assert x402 is None and offer.x402 is None, "no router: lanes only"
