"""The one chain a mirror belongs to: chain id, genesis block hash and the indexed contracts.

The binding is stored with the indexer cursor when the mirror is first written. A chain that answers
with another chain id or genesis, contracts at other addresses, or addresses without code is another
chain (a restarted dev anvil is one, even with the same chain id and the same deterministic
addresses): the mirror's escrow and adapters say nothing about it. `differences` names what differs,
and the indexer refuses to index it, the API to serve paid work against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.chain.events import Role
from node.chain.rpc import Rpc
from node.db.models import IndexerCursor
from node.errors import ChainMismatch

FIX = ("point LORANODE_RPC_URL at the chain this database mirrors, or start on a fresh database "
       "(a fresh --data-dir for `loranode dev`)")


@dataclass(frozen=True)
class IndexedContracts:
    dataset_registry: str
    adapter_registry: str
    escrow: str
    settlement: str
    x402_channels: str | None = None  # the x402 channel contract, where the node takes x402 payments

    @classmethod
    def from_deployment(cls, dep: Any) -> IndexedContracts:
        """From node.chain.deploy's Deployment (its attribute names)."""
        return cls(dep.dataset_registry, dep.adapter_registry, dep.escrow, dep.settlement,
                   getattr(dep, "x402_channels", None))

    def roles(self) -> dict[str, Role]:
        roles = {self.dataset_registry.lower(): Role.DATASET_REGISTRY,
                 self.adapter_registry.lower(): Role.ADAPTER_REGISTRY,
                 self.escrow.lower(): Role.ESCROW, self.settlement.lower(): Role.SETTLEMENT}
        if self.x402_channels:
            roles[self.x402_channels.lower()] = Role.X402_CHANNELS
        return roles

    def fingerprint(self) -> str:
        return json.dumps({str(r): a for a, r in sorted(self.roles().items())}, sort_keys=True)


@dataclass(frozen=True)
class ChainBinding:
    chain_id: int
    genesis_hash: str  # 0x-hex, lower case
    contracts: str  # IndexedContracts.fingerprint()

    @classmethod
    def read(cls, rpc: Rpc, contracts: IndexedContracts) -> ChainBinding:
        """The binding of the chain behind `rpc`; ChainMismatch if an indexed contract has no code
        there. Raises RpcTransient when the chain cannot be reached."""
        calls = [("eth_chainId", []), ("eth_getBlockByNumber", ["0x0", False])]
        calls += [("eth_getCode", [address, "latest"]) for address in sorted(contracts.roles())]
        chain_id, genesis, *codes = rpc.batch(calls)
        missing = [a for a, code in zip(sorted(contracts.roles()), codes, strict=True) if code in (None, "0x", "")]
        if missing:
            raise ChainMismatch(f"the chain has no contract code at {', '.join(missing)}: the contracts "
                                f"this node indexes are not deployed there; {FIX}", missing=missing)
        return cls(int(chain_id, 16), str(genesis["hash"]).lower(), contracts.fingerprint())

    def differences(self, live: ChainBinding) -> dict[str, dict[str, Any]]:
        """What differs between this (stored) binding and `live`: {field: {stored, live}}."""
        return {name: {"stored": mine, "live": theirs}
                for name, mine, theirs in (("chain_id", self.chain_id, live.chain_id),
                                           ("genesis_hash", self.genesis_hash, live.genesis_hash),
                                           ("contracts", self.contracts, live.contracts))
                if mine != theirs}

    def check(self, live: ChainBinding) -> None:
        """Raise ChainMismatch, naming what differs and how to fix it, unless `live` is this chain."""
        diff = self.differences(live)
        if diff:
            raise ChainMismatch(mismatch_message(diff), differences=diff)


def mismatch_message(diff: dict[str, Any]) -> str:
    names = {"chain_id": "chain id", "genesis_hash": "genesis block hash", "contracts": "contract addresses"}
    what = " and ".join(names[k] for k in diff)
    return f"the mirror was written from another chain (the RPC's chain has another {what}); {FIX}"


def mirror_binding_fault(rpc: Rpc, contracts: IndexedContracts, session: Session) -> str | None:
    """Why the mirror in `session` cannot serve the chain behind `rpc` (None if it can, or if it is not
    bound yet: the indexer binds it at its first write). Raises RpcTransient if the chain is unreachable."""
    cursor = session.scalars(select(IndexerCursor)).first()
    if cursor is None or cursor.genesis_hash is None:
        return None
    try:
        live = ChainBinding.read(rpc, contracts)
    except ChainMismatch as e:
        return e.message
    diff = ChainBinding(cursor.chain_id, cursor.genesis_hash, cursor.contracts).differences(live)
    return mismatch_message(diff) if diff else None
