"""Typed bindings of the loranode contracts, used by the CLI, the settlement worker, the devkit and tests.

`Contracts.connect(rpc, deployment, key)` gives one object per contract. Writes send a transaction
signed by `key` and wait for its receipt (a revert raises `ChainError` with the decoded custom error);
views return ints, checksummed addresses, bytes and frozen dataclasses. Ids are ints, hashes 32 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import encode
from eth_hash.auto import keccak
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.providers import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse, TxReceipt

from node.chain.contract_client import ContractClient, NonceLock, event_args, local_nonce_lock
from node.chain.deploy import Deployment
from node.chain.tx_manager import FeePolicy
from node.errors import ChainError
from node.protocol.eip712 import Domain
from node.protocol.voucher import SignedVoucher, Voucher

CLAIMS_PER_BATCH = 500  # eth_calls per JSON-RPC batch (hosted RPCs take 1,000 at most)


def _a(address: str) -> str:
    return str(Web3.to_checksum_address(address))


def lineage_hash(dataset_ids: Sequence[int], weights_bps: Sequence[int]) -> bytes:
    """keccak256(abi.encode(uint256[] datasetIds, uint16[] weightsBps)), as the AdapterRegistry stores it."""
    return keccak(encode(["uint256[]", "uint16[]"], [list(dataset_ids), list(weights_bps)]))


# The lineage of the base model served alone: no datasets (what a base-model receipt's lineageHash is).
EMPTY_LINEAGE_HASH = lineage_hash((), ())


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: int
    owner: str
    payout: str
    content_hash: bytes
    uri: str


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: int
    owner: str
    base_model: bytes
    weights_sha256: bytes
    uri: str
    owner_share_bps: int
    lineage_hash: bytes
    is_deprecated: bool


@dataclass(frozen=True)
class EscrowAccount:
    balance: int
    thawing: int
    thaw_end_at: int  # unix seconds; 0 when nothing thaws


@dataclass(frozen=True)
class EpochInfo:
    rewards_root: bytes
    rewards_total: int
    receipts_root: bytes
    receipt_count: int
    unlock_at: int
    is_vetoed: bool


@dataclass(frozen=True)
class ClaimRequest:
    node: str
    epoch_id: int
    account: str
    cumulative_amount: int
    proof: tuple[bytes, ...]

    def as_abi(self) -> tuple[Any, ...]:
        return (_a(self.node), self.epoch_id, _a(self.account),
                self.cumulative_amount, list(self.proof))


class _Binding:
    name = ""

    def __init__(self, client: ContractClient, address: str) -> None:
        self.client = client
        self.contract = client.contract(self.name, address)
        self.address = self.contract.address

    def _send(self, fn: str, *args: Any) -> TxReceipt:
        return self.client.transact(getattr(self.contract.functions, fn)(*args))

    def _call(self, fn: str, *args: Any) -> Any:
        return self.client.call(getattr(self.contract.functions, fn)(*args))


class Token(_Binding):
    name = "DemoToken"

    def balance_of(self, account: str) -> int:
        return int(self._call("balanceOf", _a(account)))

    def allowance(self, owner: str, spender: str) -> int:
        return int(self._call("allowance", _a(owner), _a(spender)))

    def approve(self, spender: str, amount: int) -> TxReceipt:
        return self._send("approve", _a(spender), amount)

    def mint(self, to: str, amount: int) -> TxReceipt:
        """DemoToken only: the open faucet."""
        return self._send("mint", _a(to), amount)


class DatasetRegistry(_Binding):
    name = "DatasetRegistry"

    def register(self, content_hash: bytes, uri: str, payout: str) -> int:
        receipt = self._send("register", content_hash, uri, _a(payout))
        return int(event_args(self.contract, receipt, "DatasetRegistered")[0]["datasetId"])

    def update(self, dataset_id: int, uri: str, payout: str) -> TxReceipt:
        return self._send("update", dataset_id, uri, _a(payout))

    def get(self, dataset_id: int) -> DatasetInfo:
        owner, payout, content_hash, uri = self._call("datasets", dataset_id)
        return DatasetInfo(dataset_id, owner, payout, bytes(content_hash), uri)

    def count(self) -> int:
        return int(self._call("datasetCount"))


class AdapterRegistry(_Binding):
    name = "AdapterRegistry"

    def register(self, base_model: bytes, weights_sha256: bytes, uri: str, dataset_ids: Sequence[int],
                 weights_bps: Sequence[int], owner_share_bps: int) -> int:
        receipt = self._send("register", base_model, weights_sha256, uri, list(dataset_ids),
                             list(weights_bps), owner_share_bps)
        return int(event_args(self.contract, receipt, "AdapterRegistered")[0]["adapterId"])

    def deprecate(self, adapter_id: int) -> TxReceipt:
        return self._send("deprecate", adapter_id)

    def get(self, adapter_id: int) -> AdapterInfo:
        owner, base, weights, uri, share, lineage, deprecated = self._call("adapters", adapter_id)
        return AdapterInfo(adapter_id, owner, bytes(base), bytes(weights), uri, int(share), bytes(lineage),
                           bool(deprecated))

    def count(self) -> int:
        return int(self._call("adapterCount"))


class PaymentEscrow(_Binding):
    name = "PaymentEscrow"

    def deposit(self, node: str, amount: int, token: Token) -> TxReceipt:
        """Approves the escrow for `amount` when needed, then deposits it for `node`."""
        if token.allowance(self.client.address, self.address) < amount:
            token.approve(self.address, amount)
        return self._send("deposit", _a(node), amount)

    def thaw(self, node: str, amount: int) -> TxReceipt:
        return self._send("thaw", _a(node), amount)

    def withdraw(self, node: str) -> TxReceipt:
        return self._send("withdraw", _a(node))

    def account(self, payer: str, node: str) -> EscrowAccount:
        balance, thawing, end_at = self._call("accounts", _a(payer),
                                              _a(node))
        return EscrowAccount(int(balance), int(thawing), int(end_at))

    def thaw_period_s(self) -> int:
        return int(self._call("thawPeriod"))


class Settlement(_Binding):
    name = "Settlement"

    def domain(self) -> Domain:
        return Domain(self.client.chain_id, self.address)

    def settle_function(self, epoch_id: int, vouchers: Sequence[SignedVoucher], amounts: Sequence[int],
                        rewards_root: bytes, rewards_total: int, receipts_root: bytes,
                        receipt_count: int) -> ContractFunction:
        """The unsent call, for a transaction manager that signs, prices and tracks it itself."""
        return self.contract.functions.settle(epoch_id, [v.as_abi() for v in vouchers], list(amounts),
                                              rewards_root, rewards_total, receipts_root, receipt_count)

    def settle(self, epoch_id: int, vouchers: Sequence[SignedVoucher], amounts: Sequence[int],
               rewards_root: bytes, rewards_total: int, receipts_root: bytes,
               receipt_count: int) -> TxReceipt:
        return self.client.transact(self.settle_function(epoch_id, vouchers, amounts, rewards_root,
                                                         rewards_total, receipts_root, receipt_count))

    def claim(self, node: str, epoch_id: int, account: str, cumulative_amount: int,
              proof: Sequence[bytes]) -> TxReceipt:
        return self._send("claim", _a(node), epoch_id, _a(account),
                          cumulative_amount, list(proof))

    def claim_many(self, claims: Sequence[ClaimRequest]) -> TxReceipt:
        return self._send("claimMany", [c.as_abi() for c in claims])

    def simulate_claim_many(self, claims: Sequence[ClaimRequest]) -> int:
        """claimMany as an eth_call: the total it would pay, or the ChainError it would revert with."""
        return int(self._call("claimMany", [c.as_abi() for c in claims]))

    def veto(self, node: str, epoch_id: int) -> TxReceipt:
        return self._send("veto", _a(node), epoch_id)

    def amend(self, node: str, rewards_root: bytes, rewards_total: int, receipts_root: bytes,
              receipt_count: int) -> TxReceipt:
        """Guardian only: replaces `node`'s first vetoed epoch with a corrected root over its whole pot
        (`rewards_total` must equal `rewards_total(node)`), forgets its later epochs and lifts the veto."""
        return self._send("amend", _a(node), rewards_root, rewards_total, receipts_root, receipt_count)

    def last_epoch(self, node: str) -> int:
        return int(self._call("lastEpoch", _a(node)))

    def epoch(self, node: str, epoch_id: int) -> EpochInfo:
        root, total, receipts, count, unlock, vetoed = self._call("epochs", _a(node), epoch_id)
        return EpochInfo(bytes(root), int(total), bytes(receipts), int(count), int(unlock), bool(vetoed))

    def is_claimable(self, node: str, epoch_id: int) -> bool:
        return bool(self._call("isClaimable", _a(node), epoch_id))

    def collected(self, payer: str, node: str, lane: int) -> int:
        return int(self._call("collected", _a(payer), _a(node), lane))

    def claimed(self, node: str, account: str) -> int:
        return int(self._call("claimed", _a(node), _a(account)))

    def rewards_total(self, node: str) -> int:
        return int(self._call("rewardsTotal", _a(node)))

    def paid_out(self, node: str) -> int:
        return int(self._call("paidOut", _a(node)))

    def claims_of(self, node: str, accounts: Sequence[str]) -> tuple[list[int], int]:
        """(`claimed(node, a)` for each of `accounts`, `paidOut(node)`), read at one block in JSON-RPC
        batches of CLAIMS_PER_BATCH calls: an amend over thousands of payees costs a few requests."""
        block = hex(self.client.w3.eth.block_number)
        calls = [self.contract.encode_abi("claimed", [_a(node), _a(a)]) for a in accounts]
        calls.append(self.contract.encode_abi("paidOut", [_a(node)]))
        values: list[int] = []
        for start in range(0, len(calls), CLAIMS_PER_BATCH):
            batch = [(RPCEndpoint("eth_call"), [{"to": self.address, "data": data}, block])
                     for data in calls[start:start + CLAIMS_PER_BATCH]]
            answers = self._batching_provider().make_batch_request(batch)
            if not isinstance(answers, list) or len(answers) != len(batch) or any(  # in request order by id
                    a.get("id") is None or a.get("error") or a.get("result") is None for a in answers):
                failed: RPCResponse | dict[str, Any] = answers if isinstance(answers, dict) else next(
                    (a for a in answers if a.get("error")), {})
                raise ChainError("the RPC refused a batched read of claims (JSON-RPC batches needed)",
                                 error=str(failed.get("error"))[:200], num_calls=len(batch))
            values += [int(a["result"], 16) for a in answers]
        return values[:-1], values[-1]

    def _batching_provider(self) -> JSONBaseProvider:
        provider = self.client.w3.provider
        if not isinstance(provider, JSONBaseProvider):
            raise ChainError("the RPC provider cannot send JSON-RPC batches", provider=type(provider).__name__)
        return provider

    def first_vetoed_epoch(self, node: str) -> int:
        return int(self._call("firstVetoedEpoch", _a(node)))

    def protocol_bps(self) -> int:
        return int(self._call("protocolBps"))

    def node_bps(self) -> int:
        return int(self._call("nodeBps"))

    def treasury(self) -> str:
        return str(self._call("treasury"))

    def voucher_digest(self, voucher: Voucher) -> bytes:
        return bytes(self._call("voucherDigest", voucher.as_abi()))


@dataclass(frozen=True)
class Contracts:
    """All bindings of one deployment, sharing one client (and so one signing key)."""

    client: ContractClient
    deployment: Deployment
    token: Token
    datasets: DatasetRegistry
    adapters: AdapterRegistry
    escrow: PaymentEscrow
    settlement: Settlement

    @classmethod
    def connect(cls, w3_or_rpc_url: Web3 | str, deployment: Deployment, key: str | None = None,
                fees: FeePolicy | None = None, nonce_lock: NonceLock = local_nonce_lock) -> Contracts:
        """`fees`: how its transactions are priced and replaced while not mined (the node's settings');
        `nonce_lock`: whom its nonces are picked one at a time with (`tx_store.key_lock`: every process)."""
        client = ContractClient(w3_or_rpc_url, key, fees=fees, nonce_lock=nonce_lock)
        return cls(client, deployment, Token(client, deployment.token),
                   DatasetRegistry(client, deployment.dataset_registry),
                   AdapterRegistry(client, deployment.adapter_registry),
                   PaymentEscrow(client, deployment.escrow), Settlement(client, deployment.settlement))

    def as_signer(self, key: str) -> Contracts:
        """The same deployment, writing with another key (payer, node, contributor...)."""
        return Contracts.connect(self.client.w3, self.deployment, key, self.client.fees, self.client.nonce_lock)
