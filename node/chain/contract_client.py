"""A web3 connection that signs and sends contract transactions and decodes custom-error reverts.

A `ContractClient` holds a web3 connection and (for writes) one signing key. Every write builds the
transaction (its gas estimate is where a revert shows up first), signs it locally, sends it and waits
for the receipt, replacing it with higher fees on the same nonce while it is not mined (never above
the fee policy's cap). The nonce is picked and first broadcast under `nonce_lock(sender)`, held until the
RPC's pending count shows the transaction: clients on one key in other processes (API replicas sharing
the x402 gas key) pass a lock of their shared database (`tx_store.key_lock`) and never sign one nonce
twice; the default lock covers the clients of this process. A revert raises `ChainError` whose `error`
fact is the decoded custom error name and `args` its arguments,
e.g. `ChainError(error="EpochOutOfOrder", args={"expected": 2, ...})`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

from eth_abi import decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ABIError, ChecksumAddress
from eth_utils import function_abi_to_4byte_selector
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import RPCEndpoint, TxReceipt

from node.chain.artifacts import Artifact, load_artifacts
from node.chain.tx_manager import FeePolicy
from node.errors import ChainError, TxNotMined
from node.protocol.hexstr import from_hex, to_hex

log = logging.getLogger(__name__)
RECEIPT_TIMEOUT_S = 120.0
RECEIPT_POLL_S = 0.1
DEFAULT_BUMP_AFTER_S = 15.0  # about a block on Ethereum: a transaction priced too low is replaced this often
# what a node answers to a replacement it will not take, or to one whose nonce an earlier attempt used
_UNDERPRICED = ("underpriced", "fee too low", "less than block base fee", "max fee per gas less than")
_REPLACEMENT_REFUSED = ("already known", "already imported", "nonce too low", *_UNDERPRICED)
POOL_WAIT_S = 5.0  # how long a sender waits for the RPC's pending count to show what it just broadcast
NonceLock = Callable[[str], AbstractContextManager[Any]]
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


def local_nonce_lock(sender: str) -> threading.Lock:
    """The lock of `sender`'s nonce shared by every client of this process."""
    with _LOCAL_LOCKS_GUARD:
        return _LOCAL_LOCKS.setdefault(sender.lower(), threading.Lock())


def web3_for(w3_or_rpc_url: Web3 | str) -> Web3:
    if isinstance(w3_or_rpc_url, Web3):
        return w3_or_rpc_url
    # web3 checks the chain id before every eth_call: asked once per connection, a view is one request
    return Web3(Web3.HTTPProvider(w3_or_rpc_url, request_kwargs={"timeout": 30}, cache_allowed_requests=True,
                                  cacheable_requests={RPCEndpoint("eth_chainId")}))


class RevertDecoder:
    """Maps revert data to (custom error name, arguments) using every ABI in the build."""

    def __init__(self, artifacts: dict[str, Artifact]) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for art in artifacts.values():
            for item in art.abi:
                if item.get("type") == "error":
                    sel = function_abi_to_4byte_selector(cast(ABIError, item))  # an ABI entry of type error
                    self._errors[sel] = (item["name"], [i["name"] for i in item["inputs"]],
                                         [_abi_type(i) for i in item["inputs"]])

    def decode(self, data: str | bytes | None) -> tuple[str, dict[str, Any]]:
        raw = from_hex(data) if isinstance(data, str) else (data or b"")
        if raw[:4] == bytes.fromhex("08c379a0"):
            return "Error", {"message": decode(["string"], raw[4:])[0]}
        known = self._errors.get(raw[:4])
        if known is None:
            return "unknown", {"data": to_hex(raw)}
        name, names, types = known
        values = decode(types, raw[4:]) if types else ()
        return name, {n or f"arg{i}": _plain(t, v)
                      for i, (n, t, v) in enumerate(zip(names, types, values, strict=True))}


def _abi_type(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        components = ",".join(_abi_type(c) for c in item["components"])
        return f"({components}){item['type'][5:]}"
    return str(item["type"])


def _plain(abi_type: str, v: Any) -> Any:
    if abi_type == "address":
        return Web3.to_checksum_address(v)
    return to_hex(v) if isinstance(v, bytes) else v


class ContractClient:
    """A web3 connection, the build's ABIs, and optionally the key that signs every write."""

    def __init__(self, w3_or_rpc_url: Web3 | str, key: str | None = None,
                 artifacts: dict[str, Artifact] | None = None, fees: FeePolicy | None = None,
                 receipt_timeout_s: float = RECEIPT_TIMEOUT_S, nonce_lock: NonceLock = local_nonce_lock) -> None:
        self.w3 = web3_for(w3_or_rpc_url)
        self.nonce_lock = nonce_lock
        self.fees = fees or FeePolicy(bump_after_s=DEFAULT_BUMP_AFTER_S)
        self.receipt_timeout_s = receipt_timeout_s
        self.artifacts = artifacts or load_artifacts()
        self.account: LocalAccount | None = Account.from_key(key) if key else None
        self.decoder = RevertDecoder(self.artifacts)
        self.chain_id = int(self.w3.eth.chain_id)

    @property
    def address(self) -> ChecksumAddress:
        if self.account is None:
            raise ChainError("this client has no signing key")
        return self.account.address

    def contract(self, name: str, address: str) -> Contract:
        abi = list(self.artifacts[name].abi)
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)

    def call(self, fn: ContractFunction) -> Any:
        try:
            return fn.call()
        except ContractLogicError as exc:
            raise self._revert(exc, fn.fn_name) from exc

    def transact(self, fn: ContractFunction) -> TxReceipt:
        return self._send(fn.fn_name, lambda tx: fn.build_transaction(tx))

    def deploy(self, name: str, *args: Any) -> tuple[ChecksumAddress, TxReceipt]:
        art = self.artifacts[name]
        factory = self.w3.eth.contract(abi=list(art.abi), bytecode=art.bytecode)
        receipt = self._send(f"deploy {name}", lambda tx: factory.constructor(*args).build_transaction(tx))
        address = receipt["contractAddress"]
        if address is None:  # a mined creation always has one: an RPC that leaves it out is not answering right
            raise ChainError(f"deploy {name}: the receipt names no contract address",
                             tx=receipt["transactionHash"].to_0x_hex())
        log.info("deployed %s at %s (block %d)", name, address, receipt["blockNumber"])
        return address, receipt

    def _send(self, what: str, build: Any) -> TxReceipt:
        sender = self.address
        assert self.account is not None
        with self.nonce_lock(sender):  # pick, sign and broadcast: no other client of this key takes the nonce
            tx = self._build(what, build, sender)
            signed = self.account.sign_transaction(tx)
            if self._broadcast(signed.raw_transaction, is_replacement=False):
                self._await_pool(sender, tx["nonce"])
        receipt = self._mine(what, tx, [signed.hash])
        if receipt["status"] != 1:
            raise ChainError(f"{what}: transaction reverted", tx=receipt["transactionHash"].to_0x_hex(),
                             block=receipt["blockNumber"])
        return receipt

    def _build(self, what: str, build: Any, sender: ChecksumAddress) -> dict[str, Any]:
        try:
            tx = dict(build({"from": sender, "nonce": self.w3.eth.get_transaction_count(sender, "pending"),
                             "chainId": self.chain_id}))
        except ContractLogicError as exc:
            raise self._revert(exc, what) from exc
        if "maxFeePerGas" in tx:
            tx["maxFeePerGas"] = min(int(tx["maxFeePerGas"]), self.fees.max_fee_cap)
            tx["maxPriorityFeePerGas"] = min(int(tx["maxPriorityFeePerGas"]), tx["maxFeePerGas"])
        return tx

    def _await_pool(self, sender: ChecksumAddress, nonce: int) -> None:
        """Until the RPC counts `nonce` as used (or POOL_WAIT_S), so the next holder of the lock picks past it."""
        until = time.monotonic() + POOL_WAIT_S
        while self.w3.eth.get_transaction_count(sender, "pending") <= nonce and time.monotonic() < until:
            time.sleep(RECEIPT_POLL_S)

    def _mine(self, what: str, tx: dict[str, Any], hashes: list[HexBytes]) -> TxReceipt:
        """Waits for `tx` (its first attempt broadcast already, `hashes`); while none of its attempts is
        mined it is signed again every `fees.bump_after_s` with the same nonce and higher fees
        (FeePolicy.bumped, never above the cap), so a fee spike never strands this key's nonce and
        everything queued behind it."""
        assert self.account is not None
        deadline = time.monotonic() + self.receipt_timeout_s
        while True:
            receipt = self._receipt_of(hashes, min(time.monotonic() + self.fees.bump_after_s, deadline))
            if receipt is not None:
                return receipt
            if time.monotonic() >= deadline:
                raise TxNotMined(f"{what}: not mined in time", tx=hashes[-1].to_0x_hex(), nonce=tx["nonce"],
                                 max_fee_per_gas=tx.get("maxFeePerGas"), waited_s=self.receipt_timeout_s)
            fees = self.fees.bumped(tx["maxFeePerGas"], tx["maxPriorityFeePerGas"]) if "maxFeePerGas" in tx else None
            if fees is None:
                continue
            log.info("%s: not mined yet, replacing nonce %d with max fee %d", what, tx["nonce"], fees[0])
            tx = {**tx, "maxFeePerGas": fees[0], "maxPriorityFeePerGas": fees[1]}
            signed = self.account.sign_transaction(tx)
            if signed.hash not in hashes:
                hashes.append(signed.hash)
                self._broadcast(signed.raw_transaction, is_replacement=True)

    def _broadcast(self, raw: HexBytes, is_replacement: bool) -> bool:
        """True when the node took `raw` into its pool."""
        try:
            self.w3.eth.send_raw_transaction(raw)
            return True
        except Web3RPCError as exc:  # an earlier attempt mined, or the node still prefers it: wait for it
            text = str(exc).lower()
            benign = _REPLACEMENT_REFUSED if is_replacement else _UNDERPRICED
            if not any(m in text for m in benign):
                raise ChainError("broadcast refused", reason=str(exc)) from exc
            log.warning("replacement refused (%s): waiting for an earlier attempt", text[:80])
            return False

    def _receipt_of(self, hashes: list[HexBytes], until: float) -> TxReceipt | None:
        while True:
            for tx_hash in reversed(hashes):
                try:
                    return self.w3.eth.get_transaction_receipt(tx_hash)
                except TransactionNotFound:
                    continue
            if time.monotonic() >= until:
                return None
            time.sleep(RECEIPT_POLL_S)

    def _revert(self, exc: ContractLogicError, what: str) -> ChainError:
        data = exc.data if isinstance(exc.data, str) else None
        name, args = self.decoder.decode(data)
        return ChainError(f"{what} reverted: {name}", error=name, args=args)


def event_args(contract: Contract, receipt: TxReceipt, event: str) -> list[dict[str, Any]]:
    """Decoded arguments of every `event` that `contract` emitted in `receipt`."""
    ev = getattr(contract.events, event)
    topic = from_hex(ev.topic)
    return [dict(ev().process_log(lg)["args"]) for lg in receipt["logs"]
            if lg["address"] == contract.address and lg["topics"] and bytes(lg["topics"][0]) == topic]
