"""The worker's x402 transactions (the guard's claims, the epoch's sweep) as transaction-manager intents of
the operator key, like its settles (docs/x402.md, "One epoch with x402 receipts").

Sent directly, a claim took `eth_getTransactionCount(pending)` as its nonce outside the manager's writer
lock: the nonce of a settle signed but not in the mempool (dropped, or a crash before its broadcast),
which then failed; and a claim priced out stayed stuck with nothing to bump it. As intents they share
the settles' nonce discipline (one writer per key, nonces in order), fee bumps, re-broadcasts and
reorg handling.

An intent's key is its calldata's hash: the same claim computed again (the mirror not caught up, the
next tick, a restarted worker) is the same intent, never a second transaction. One x402 intent is in
flight at a time: while one is pending, nothing new is sent (a later claim would cover the same
channels). A claim whose estimate reverts raises `ChainError` and sends nothing; one reverted on chain
is reported as failed.
"""

from __future__ import annotations

import logging

from eth_hash.auto import keccak
from web3.exceptions import ContractLogicError

from node.chain.tx_manager import TxManager, TxRecord, TxState
from node.chain.x402_channels import ClaimRow, X402Chain
from node.errors import ChainError
from node.protocol.hexstr import from_hex

log = logging.getLogger(__name__)
PREFIX = "x402-"
DONE = (TxState.MINED, TxState.FINAL)


class X402Intents:
    def __init__(self, chain: X402Chain, tx: TxManager) -> None:
        assert chain.router is not None, "x402 intents need the node's router"
        self.chain, self.tx, self.router = chain, tx, chain.router

    def in_flight(self) -> bool:
        """Polls every open x402 intent of the operator key (bumping a stuck one, re-broadcasting a lost
        one); True while one is still pending."""
        keys = [k for k in self.tx.store.open_keys(self.tx.sender) if k.startswith(PREFIX)]
        return any(self.tx.poll(key).state is TxState.PENDING for key in keys)

    def collect(self, rows: list[ClaimRow]) -> TxRecord:
        """The router claims `rows` and sweeps into the node's escrow account; the intent as it stands
        after one poll (mined at once on an automining chain). ChainError when it would revert or did."""
        data = self.router.encode_abi("collect", args=[[r.as_tuple() for r in rows]])
        return self._send("collect", data)

    def sweep(self) -> TxRecord | None:
        """What the channel contract owes the router, and anything it holds, into the escrow account (None:
        nothing to move). Keyed by the totals it moves, so each new amount owed is its own intent."""
        client, router = self.chain.client, self.router
        token = client.call(router.functions.token())
        claimed, settled = client.call(self.chain.channels.functions.receivers(router.address, token))
        held = client.call(client.contract("DemoToken", token).functions.balanceOf(router.address))
        if claimed == settled and held == 0:
            return None
        return self._send(f"sweep:{claimed}:{held}", router.encode_abi("sweep", args=[]))

    def _send(self, what: str, data: str) -> TxRecord:
        kind = what.split(":")[0]
        key = f"{PREFIX}{kind}:{self.tx.sender.lower()}:{keccak(from_hex(data) + what.encode()).hex()[:32]}"
        try:
            sent = self.tx.send(key, self.router.address, data)
        except ChainError as exc:  # its gas estimate reverts: the contract's error, by name
            cause = exc.__cause__
            if not isinstance(cause, ContractLogicError) or not isinstance(cause.data, str):
                raise
            name, args = self.chain.client.decoder.decode(cause.data)
            raise ChainError(f"x402 {kind} would revert: {name}", error=name, args=args) from exc
        record = self.tx.poll(sent.key)
        if record.state is TxState.FAILED:
            raise ChainError(f"x402 {kind} failed on chain", key=key, reason=record.error)
        log.info("x402 %s: intent %s nonce %d %s", kind, key, record.nonce, record.state.value)
        return record
