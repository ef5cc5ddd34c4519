"""The demo's second payer: an agent paying with the stock x402 Python SDK (`batch-settlement`, its own
`requests` adapter, no integration code), next to the lane dApp (docs/x402.md). The node sends its
deposit (gasless for the agent) and turns each voucher into a receipt of the same epochs and split."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients.requests import x402HTTPAdapter
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from node.chain.contract_client import ContractClient
from node.chain.x402_channels import deploy_router, ensure_channel_contracts
from node.client.payer import NodeInfo, verify_receipt
from node.devkit.local_node import FIRST_USER, OPERATOR, LocalNode

AGENT = FIRST_USER + 6  # the x402 payer's dev account


@dataclass
class AgentRun:
    receipts: list[dict[str, Any]] = field(default_factory=list)
    deposited: int = 0
    streamed: int = 0
    channel: str = ""


def x402_router(node: LocalNode) -> str:
    """The channel contracts at their canonical addresses (anvil) and the node's router: its channels'
    receiver, sweeping into the node's escrow account (what `LORANODE_X402_ROUTER` names)."""
    operator = ContractClient(node.anvil.rpc_url, node.anvil.keys[OPERATOR])
    ensure_channel_contracts(operator)
    return deploy_router(operator, operator.address, node.deployment.escrow)


def _session(node: LocalNode) -> requests.Session:
    account = Account.from_key(node.anvil.keys[AGENT])
    scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(account, node.anvil.rpc_url))
    client = x402ClientSync().register(f"eip155:{node.deployment.chain_id}", scheme)
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
    session = requests.Session()
    session.mount("http://", x402HTTPAdapter(client))
    return session


def _settled(header: str) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(header)))


def run_agent(node: LocalNode, info: NodeInfo, models: list[str], prompts: tuple[str, ...], count: int,
              tokens: int) -> AgentRun:
    """`count` chat completions paid by the SDK, every third one streamed (its PAYMENT-RESPONSE is in the
    last chunk; the SDK resynchronises on its next request); each receipt checked against the node."""
    agent = node.contracts(AGENT)
    agent.token.mint(agent.client.address, tokens)
    session, run = _session(node), AgentRun()
    for i in range(count):
        stream = i % 3 == 2
        body: dict[str, Any] = {"model": models[i % len(models)], "max_tokens": 12, "stream": stream,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
        with session.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=120, stream=stream) as resp:
            resp.raise_for_status()
            if stream:
                events = [line for line in resp.iter_lines() if line.startswith(b"data: {")]
                last = json.loads(events[-1][6:])
                receipt, settled = last["receipt"], _settled(last["payment_response"])
                run.streamed += 1
            else:
                receipt, settled = resp.json()["receipt"], _settled(resp.headers["PAYMENT-RESPONSE"])
        assert verify_receipt(receipt, info.domain) == info.node, "a receipt the node did not sign"
        assert settled["extra"]["chargedAmount"] == receipt["fee"], "PAYMENT-RESPONSE and receipt disagree"
        run.deposited += int(settled["amount"] or 0)
        run.channel = settled["extra"]["channelState"]["channelId"]
        run.receipts.append(receipt)
    return run


def agent_line(run: AgentRun, seconds: float, token: int) -> str:
    fees = sum(int(r["fee"]) for r in run.receipts)
    return (f"the agent paid {len(run.receipts)} requests with the stock x402 SDK ({run.streamed} streamed) in "
            f"{seconds:.1f}s: batch-settlement channel {run.channel[:12]}..., {run.deposited / token:.6f} tokens "
            f"deposited through the node; every receipt verified; fees {fees / token:.6f} tokens")

