"""Deploy the whole system to one chain and record where it lives: deployments/<chainId>.json.

Order: token (a DemoToken3009 unless one is given: an ERC-20 with ERC-3009, for x402 deposits, docs/x402.md),
DatasetRegistry, AdapterRegistry, PaymentEscrow, Settlement. The escrow's `settlement` is immutable, so its
address is computed from the deployer's nonce before the escrow goes out and checked after the Settlement lands.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import rlp
from eth_hash.auto import keccak
from web3 import Web3

from node.chain.contract_client import ContractClient
from node.errors import ChainError, ConfigError
from node.protocol.hexstr import from_hex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """Where the contracts live on one chain. `from_block` is the first deployment's block (where an
    indexer starts); `blocks` the deployment block of each contract by name."""

    chain_id: int
    token: str
    dataset_registry: str
    adapter_registry: str
    escrow: str
    settlement: str
    deployer: str
    guardian: str
    treasury: str
    protocol_bps: int
    node_bps: int
    thaw_period_s: int
    challenge_period_s: int
    from_block: int
    blocks: dict[str, int] = field(default_factory=dict)
    # x402 batch-settlement (docs/x402.md): the channel contract, its ERC-3009 collector, the node's router
    x402_channels: str | None = None
    x402_collector: str | None = None
    x402_router: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        return cls(**{**data, "blocks": dict(data.get("blocks", {}))})


def create_address(sender: str, nonce: int) -> str:
    """The address a CREATE from `sender` at `nonce` lands on."""
    raw = keccak(rlp.encode([from_hex(sender), nonce]))[12:]
    return Web3.to_checksum_address(raw)


def deploy_all(w3_or_rpc_url: Web3 | str, deployer_key: str, *, guardian: str, treasury: str,
               protocol_bps: int, node_bps: int, thaw_period_s: int, challenge_period_s: int,
               token: str | None = None) -> Deployment:
    if protocol_bps < 0 or node_bps < 0 or protocol_bps + node_bps > 10_000:
        raise ConfigError("protocol_bps + node_bps must be within 0..10000",
                          protocol_bps=protocol_bps, node_bps=node_bps)
    if thaw_period_s <= 0:
        raise ConfigError("a thaw period of 0 lets a payer withdraw what a node charged before it settles; "
                          "give the seconds a node needs to collect (loranode chain deploy checks them)",
                          thaw_period_s=thaw_period_s)
    client = ContractClient(w3_or_rpc_url, deployer_key)
    blocks: dict[str, int] = {}

    def deploy(name: str, *args: Any) -> str:
        address, receipt = client.deploy(name, *args)
        blocks[name] = int(receipt["blockNumber"])
        return address

    token_address = Web3.to_checksum_address(token) if token else deploy("DemoToken3009")  # x402 deposits: ERC-3009
    datasets = deploy("DatasetRegistry")
    adapters = deploy("AdapterRegistry", datasets)
    nonce = client.w3.eth.get_transaction_count(client.address, "pending")
    predicted = create_address(client.address, nonce + 1)
    escrow = deploy("PaymentEscrow", token_address, thaw_period_s, predicted)
    settlement = deploy("Settlement", token_address, escrow, Web3.to_checksum_address(treasury),
                        protocol_bps, node_bps, Web3.to_checksum_address(guardian), challenge_period_s)
    if settlement != predicted:
        raise ChainError("Settlement landed off its predicted address (another tx from the deployer?)",
                         predicted=predicted, actual=settlement, escrow=escrow)
    dep = Deployment(chain_id=client.chain_id, token=token_address, dataset_registry=datasets,
                     adapter_registry=adapters, escrow=escrow, settlement=settlement, deployer=client.address,
                     guardian=Web3.to_checksum_address(guardian), treasury=Web3.to_checksum_address(treasury),
                     protocol_bps=protocol_bps, node_bps=node_bps, thaw_period_s=thaw_period_s,
                     challenge_period_s=challenge_period_s, from_block=min(blocks.values()), blocks=blocks)
    log.info("deployed loranode contracts on chain %d (settlement %s)", dep.chain_id, dep.settlement)
    return dep


def write_deployment(dep: Deployment, folder: Path | str) -> Path:
    path = Path(folder) / f"{dep.chain_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dep.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_deployment(path: Path | str) -> Deployment:
    try:
        return Deployment.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("cannot read deployment file", path=str(path), reason=str(exc)) from exc
