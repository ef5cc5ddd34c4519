"""Transactions sent by a `ContractClient` (the x402 gas key's deposits and refunds, `loranode claim`,
deployments) under a sustained base-fee spike: replaced with higher fees on the same nonce until one is
mined, never above the configured cap. Real anvil.

The attack without this: a transaction priced before the spike sat in the mempool for good, and every
later one of the same key queued behind its nonce: x402 deposits (so x402 payments) and claims stalled
for as long as the fees stayed high.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.tx_manager import FeePolicy
from node.errors import ChainError

pytestmark = pytest.mark.chain
RECIPIENT = "0x000000000000000000000000000000000000bEEF"


def _fees(w3: Web3) -> dict[str, int]:
    """What a transaction priced now offers (web3's default: twice the base fee plus the tip)."""
    base = int(w3.eth.get_block("latest")["baseFeePerGas"])  # type: ignore[typeddict-item]
    tip = int(w3.eth.max_priority_fee)
    return {"maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip}


@contextmanager
def fee_spike(anvil: Anvil, base_fee: int) -> Iterator[None]:
    """Every block mined meanwhile has `base_fee` (a spike that lasts, not one that decays)."""
    anvil.rpc("evm_setAutomine", False)
    stop = threading.Event()

    def mine() -> None:
        while not stop.is_set():
            anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(base_fee))
            anvil.rpc("evm_mine")
            stop.wait(0.2)

    miner = threading.Thread(target=mine, daemon=True)
    miner.start()
    try:
        yield
    finally:
        stop.set()
        miner.join()


def _transfer(client: ContractClient, value: int, fees: dict[str, int]) -> Any:
    return client._send("transfer", lambda tx: {**tx, "to": RECIPIENT, "value": value, "gas": 21_000, **fees})


def test_a_transaction_stuck_under_a_fee_spike_is_replaced_until_it_mines(fresh_anvil: Anvil) -> None:
    client = ContractClient(fresh_anvil.rpc_url, fresh_anvil.keys[5],
                            fees=FeePolicy(bump_after_s=0.5, bump_percent=50))
    fees = _fees(client.w3)
    spiked = fees["maxFeePerGas"] * 3
    with fee_spike(fresh_anvil, spiked):
        receipt = _transfer(client, 7, fees)
    assert receipt["status"] == 1 and client.w3.eth.get_balance(RECIPIENT) == 7
    mined = client.w3.eth.get_transaction(receipt["transactionHash"])
    assert mined["maxFeePerGas"] >= spiked and mined["nonce"] == 0, "a replacement, on the same nonce"
    assert client.w3.eth.get_transaction_count(client.address) == 1, "paid once"


def test_bumps_stop_at_the_cap_and_the_wait_ends_with_a_clear_error(fresh_anvil: Anvil) -> None:
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    fees = _fees(w3)
    cap = fees["maxFeePerGas"] * 2
    client = ContractClient(w3, fresh_anvil.keys[6], receipt_timeout_s=3.0,
                            fees=FeePolicy(bump_after_s=0.5, bump_percent=50, max_fee_cap=cap))
    with fee_spike(fresh_anvil, fees["maxFeePerGas"] * 100), pytest.raises(ChainError, match="not mined") as err:
        _transfer(client, 1, fees)
    assert fees["maxFeePerGas"] < err.value.facts["max_fee_per_gas"] <= cap
    assert w3.eth.get_balance(RECIPIENT) == 0
