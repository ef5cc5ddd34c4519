"""A JavaScript dApp paying with x402, zero integration code: the official `openai` npm client over
`@x402/fetch` + `@x402/evm` (batch-settlement) against a live node on anvil (tests/api/x402_npm.mjs).
It deposits, pays chat completions streamed and not; every answer carries a receipt the node signed,
charged once each on the channel's running total, never above the request's price."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from eth_account import Account

from node.client.payer import Payer, verify_receipt
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.toolchain import REPO_ROOT, node_script_env
from tests.fixtures.paid_node import PaidNode
from tests.fixtures.x402_node import payer_key

pytestmark = [pytest.mark.chain, pytest.mark.slow]
SCRIPT = REPO_ROOT / "tests" / "api" / "x402_npm.mjs"
PAYER = 7  # this module's x402 payer (tests/fixtures/x402_node.py)


def _run_dapp(node: PaidNode) -> dict[str, Any]:
    runtime = shutil.which("node")
    assert runtime, "node (npm's runtime) is needed for this test"
    env = {**node_script_env(), "NODE_URL": node.base_url, "RPC_URL": node.local.anvil.rpc_url,
           "PAYER_KEY": payer_key(node.local, PAYER), "ADAPTER": str(node.adapter_id),
           "CHAIN_ID": str(node.local.deployment.chain_id)}
    done = subprocess.run([runtime, str(SCRIPT)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def test_the_x402_npm_client_deposits_and_pays_chat_completions_streamed_and_not(x402_node: PaidNode) -> None:
    seen = _run_dapp(x402_node)
    info = Payer(x402_node.payer_keys[0], x402_node.base_url).info
    assert seen["payer"] == Account.from_key(payer_key(x402_node.local, PAYER)).address
    total = 0
    for i, answer in enumerate(seen["answers"]):
        receipt, settled = answer["receipt"], answer["paymentResponse"]
        assert answer["text"], answer
        assert verify_receipt(receipt, info.domain) == info.node
        assert settled["success"] and settled["extra"]["chargedAmount"] == receipt["fee"]
        total += int(receipt["fee"])
        assert receipt["chargedTotal"] == settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
        after_stream = i > 0 and seen["answers"][i - 1]["kind"] == "stream"
        # the unpaid probe, [the corrective 402 after a stream the SDK could not read], then paid
        expected = [[False, 402], [True, 402], [True, 200]] if after_stream else [[False, 402], [True, 200]]
        assert answer["wire"] == expected, (i, answer["wire"])
        if answer["kind"] == "stream":
            assert answer["header"] is None, "a stream's headers leave before its charge"
    first = seen["answers"][0]["paymentResponse"]
    assert first["transaction"].startswith("0x") and int(first["amount"]) > 0, "the deposit, sent by the node"
    deposits = [int(a["paymentResponse"]["amount"]) for a in seen["answers"] if a["paymentResponse"]["transaction"]]
    channel = bytes.fromhex(first["extra"]["channelState"]["channelId"][2:])
    channels = x402_node.local.contracts(0).client.contract("X402Channels", CHANNELS_ADDRESS)
    balance, _claimed = channels.functions.channels(channel).call()
    assert balance == sum(deposits) >= total, "each deposit (and top-up) once, and served within them"
