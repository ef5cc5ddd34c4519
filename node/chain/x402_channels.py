"""The x402 channel contract on chain, as the node uses it (docs/x402.md): code at the canonical
addresses the SDKs expect, the node's router, channel reads, deposits the node submits for payers
(gasless for them) and the router's claim-and-sweep.

On anvil our `X402Channels` and `ERC3009Collector` are deployed anywhere and their runtime code copied
to the canonical addresses (`anvil_setCode`); on a chain where code is already there (the reference
deployment has the same interface) it is used as is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import cast

from eth_abi import encode
from eth_typing import ChecksumAddress
from web3.contract.contract import ContractFunction
from web3.types import RPCEndpoint, TxReceipt

from node.chain.contract_client import ContractClient
from node.chain.deploy import Deployment
from node.errors import ChainError
from node.payment.x402.refund import RefundOrder
from node.payment.x402.typed import CHANNELS_ADDRESS, ERC3009_COLLECTOR_ADDRESS, ChannelConfig, deposit_nonce
from node.payment.x402.wire import Payment
from node.protocol.eip712 import sign_digest

log = logging.getLogger(__name__)
_AUTHORIZATION_STATE_ABI = [{"type": "function", "name": "authorizationState", "stateMutability": "view",
                             "inputs": [{"name": "authorizer", "type": "address"},
                                        {"name": "nonce", "type": "bytes32"}],
                             "outputs": [{"name": "", "type": "bool"}]}]


@dataclass(frozen=True)
class OnChainChannel:
    balance: int
    total_claimed: int
    pending_withdrawal: int
    withdraw_requested_at: int
    refund_nonce: int


@dataclass(frozen=True)
class ClaimRow:
    """One channel of a claim: its config, the payer's latest voucher, and the new cumulative claimed total."""

    config: ChannelConfig
    max_claimable: int
    signature: bytes
    total_claimed: int

    def as_tuple(self) -> tuple[object, ...]:
        return ((self.config.as_tuple(), self.max_claimable), self.signature, self.total_claimed)


def ensure_channel_contracts(client: ContractClient) -> bool:
    """Code at both canonical addresses; True when it had to be set (anvil), ChainError when it cannot."""
    w3 = client.w3
    if w3.eth.get_code(CHANNELS_ADDRESS) and w3.eth.get_code(ERC3009_COLLECTOR_ADDRESS):
        return False
    channels, _ = client.deploy("X402Channels")
    collector, _ = client.deploy("ERC3009Collector", CHANNELS_ADDRESS)
    for target, source in ((CHANNELS_ADDRESS, channels), (ERC3009_COLLECTOR_ADDRESS, collector)):
        answer = w3.provider.make_request(RPCEndpoint("anvil_setCode"), [target, w3.eth.get_code(source).to_0x_hex()])
        if "error" in answer:
            raise ChainError("no x402 channel contract at its canonical address, and this chain cannot set code "
                             "there: x402 payments need the reference deployment", address=target,
                             error=str(answer["error"])[:200])
    log.info("x402 channel contracts copied to their canonical addresses")
    return True


def deploy_router(client: ContractClient, node: str, escrow: str) -> str:
    """The node's X402Router: its channels' receiver, sweeping into the node's escrow account."""
    address, _ = client.deploy("X402Router", node, CHANNELS_ADDRESS, escrow)
    return address


def deploy_x402(client: ContractClient, dep: Deployment, node: str) -> Deployment:
    """`dep` with the x402 contracts: the channel contract and its collector where they are absent (see
    `ensure_channel_contracts`), and `node`'s router unless the deployment has one. The token must have
    ERC-3009 (`receiveWithAuthorization`): DemoToken3009 does, as USDC."""
    ensure_channel_contracts(client)
    router = dep.x402_router or deploy_router(client, node, dep.escrow)
    return replace(dep, x402_channels=CHANNELS_ADDRESS, x402_collector=ERC3009_COLLECTOR_ADDRESS, x402_router=router)


def token_domain(client: ContractClient, token: str) -> tuple[str, str]:
    """The token's EIP-712 (name, version), from its ERC-5267 `eip712Domain()`."""
    abi = [{"type": "function", "name": "eip712Domain", "inputs": [], "stateMutability": "view",
            "outputs": [{"name": "fields", "type": "bytes1"}, {"name": "name", "type": "string"},
                        {"name": "version", "type": "string"}, {"name": "chainId", "type": "uint256"},
                        {"name": "verifyingContract", "type": "address"}, {"name": "salt", "type": "bytes32"},
                        {"name": "extensions", "type": "uint256[]"}]}]
    out = client.call(client.w3.eth.contract(address=client.w3.to_checksum_address(token), abi=abi)
                      .functions.eip712Domain())
    return str(out[1]), str(out[2])


class X402Chain:
    """The canonical channel contract and (optionally) the node's router, through one client.

    `authorizer_key` is the node's key (the channels' receiver authorizer) where the client sends from
    another one (the API's gas key): refunds then go out relayed, with the authorizer's signatures."""

    def __init__(self, client: ContractClient, router: str | None = None, authorizer_key: str | None = None) -> None:
        self.client, self.authorizer_key = client, authorizer_key
        self.channels = client.contract("X402Channels", CHANNELS_ADDRESS)
        self.router = client.contract("X402Router", router) if router else None

    def now(self) -> int:
        """The chain's time: the latest block's timestamp (what the token judges an authorization by)."""
        return int(self.client.w3.eth.get_block("latest")["timestamp"])

    def channel(self, channel_id: bytes) -> OnChainChannel:
        fns = self.channels.functions
        balance, claimed = self.client.call(fns.channels(channel_id))
        pending, at = self.client.call(fns.pendingWithdrawals(channel_id))
        return OnChainChannel(balance, claimed, pending, at, self.client.call(fns.refundNonce(channel_id)))

    def deposit(self, payment: Payment) -> TxReceipt | None:
        """Submits the payer's ERC-3009 deposit (the node pays the gas); None when this authorization
        was used already (the same payment sent again: its deposit is in the channel)."""
        if self.deposit_used(payment):
            return None
        return self.client.transact(self._deposit_call(payment))

    def deposit_used(self, payment: Payment) -> bool:
        """Whether the token has seen this deposit's ERC-3009 authorization (it moves tokens once)."""
        d = payment.deposit
        if d is None:
            raise ChainError("not a deposit payment")
        token_address = cast(ChecksumAddress, payment.config.token)  # ChannelConfig checksums its addresses
        token = self.client.w3.eth.contract(address=token_address, abi=_AUTHORIZATION_STATE_ABI)
        nonce = deposit_nonce(payment.voucher.channel_id, d.salt)
        return bool(self.client.call(token.functions.authorizationState(payment.config.payer, nonce)))

    def simulate_deposit(self, payment: Payment) -> None:
        """The deposit as an eth_call (what the spec's facilitator does to verify one): ChainError with the
        contract's error when it would revert."""
        self.client.call(self._deposit_call(payment))

    def _deposit_call(self, payment: Payment) -> ContractFunction:
        d = payment.deposit
        if d is None:
            raise ChainError("not a deposit payment")
        data = encode(["uint256", "uint256", "uint256", "bytes"], [d.valid_after, d.valid_before, d.salt, d.signature])
        return self.channels.functions.deposit(payment.config.as_tuple(), d.amount, ERC3009_COLLECTOR_ADDRESS, data)

    def collect(self, rows: list[ClaimRow]) -> TxReceipt:
        """The router claims `rows` and sweeps into the node's escrow account (sent by the node's key)."""
        if self.router is None:
            raise ChainError("no router configured")
        return self.client.transact(self.router.functions.collect([r.as_tuple() for r in rows]))

    def sweep(self) -> TxReceipt | None:
        """What the channel contract owes the router, and anything it holds, into the node's escrow account
        (None: nothing to move, no transaction)."""
        if self.router is None:
            raise ChainError("no router configured")
        router, token = self.router.address, self.client.call(self.router.functions.token())
        claimed, settled = self.client.call(self.channels.functions.receivers(router, token))
        held = self.client.call(self.client.contract("DemoToken", token).functions.balanceOf(router))
        if claimed == settled and held == 0:
            return None
        return self.client.transact(self.router.functions.sweep())

    def refund(self, order: RefundOrder) -> str:
        """The node, as receiver authorizer: claim what it charged with the payer's refund voucher, then
        refund `order.amount`, in one `multicall` (the claim first, so the refund cannot take it). Sent by
        the authorizer itself, or relayed by the client's key with the authorizer's signatures."""
        if self.authorizer_key is not None:
            return self._relayed_refund(order, self.authorizer_key)
        config = order.config.as_tuple()
        calls = [self.channels.encode_abi("refund", args=[config, order.amount])]
        if order.claim_to is not None:
            row = ClaimRow(order.config, order.voucher_ceiling, order.voucher_signature, order.claim_to)
            calls.insert(0, self.channels.encode_abi("claim", args=[[row.as_tuple()]]))
        receipt = self.client.transact(self.channels.functions.multicall(calls))
        return str(receipt["transactionHash"].to_0x_hex())

    def _relayed_refund(self, order: RefundOrder, key: str) -> str:
        """`claimWithSignature` and `refundWithSignature` in one `multicall`, the digests as the contract
        computes them (the refund's for the channel's current nonce)."""
        fns, config = self.channels.functions, order.config.as_tuple()
        channel_id = self.client.call(fns.getChannelId(config))
        nonce = self.client.call(fns.refundNonce(channel_id))
        refund_sig = sign_digest(key, self.client.call(fns.getRefundDigest(channel_id, nonce, order.amount)))
        calls = [self.channels.encode_abi("refundWithSignature", args=[config, order.amount, nonce, refund_sig])]
        if order.claim_to is not None:
            rows = [ClaimRow(order.config, order.voucher_ceiling, order.voucher_signature, order.claim_to).as_tuple()]
            claim_sig = sign_digest(key, self.client.call(fns.getClaimBatchDigest(rows)))
            calls.insert(0, self.channels.encode_abi("claimWithSignature", args=[rows, claim_sig]))
        receipt = self.client.transact(fns.multicall(calls))
        return str(receipt["transactionHash"].to_0x_hex())
