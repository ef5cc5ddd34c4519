"""The events the indexer mirrors, decoded straight from raw logs.

The signatures are the contracts' fixed interface (docs/contracts.md); a test checks them against
the compiled ABIs. Decoding skips web3's contract machinery: topics by hand, data with eth_abi.
Decoded values are plain Python: ints, lower-case 0x-hex addresses and bytes32, str, tuples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak

from node.errors import ChainError
from node.protocol.hexstr import from_hex, normalize, to_hex


class Role(StrEnum):
    DATASET_REGISTRY = "dataset_registry"
    ADAPTER_REGISTRY = "adapter_registry"
    ESCROW = "escrow"
    SETTLEMENT = "settlement"
    X402_CHANNELS = "x402_channels"


SIGNATURES: dict[Role, tuple[str, ...]] = {
    Role.DATASET_REGISTRY: (
        "DatasetRegistered(uint256 indexed datasetId, address indexed owner, bytes32 contentHash, "
        "string uri, address payout)",
        "DatasetUpdated(uint256 indexed datasetId, string uri, address payout)",
    ),
    Role.ADAPTER_REGISTRY: (
        "AdapterRegistered(uint256 indexed adapterId, address indexed owner, bytes32 baseModel, "
        "bytes32 weightsSha256, string uri, uint256[] datasetIds, uint16[] weightsBps, uint16 ownerShareBps, "
        "bytes32 lineageHash)",
        "AdapterDeprecated(uint256 indexed adapterId)",
    ),
    Role.ESCROW: (
        "Deposited(address indexed payer, address indexed node, uint256 amount)",
        "ThawStarted(address indexed payer, address indexed node, uint256 amount, uint64 thawEndAt)",
        "Withdrawn(address indexed payer, address indexed node, uint256 amount)",
        "Collected(address indexed payer, address indexed node, uint256 amount)",
    ),
    Role.SETTLEMENT: (
        "EpochSettled(address indexed node, uint64 indexed epochId, bytes32 rewardsRoot, "
        "uint256 rewardsTotal, bytes32 receiptsRoot, uint64 receiptCount, uint256 collected, "
        "uint64 unlockAt)",
        "VoucherCollected(address indexed node, address indexed payer, uint32 indexed lane, "
        "uint256 cumulative, uint256 amount)",
        "EpochVetoed(address indexed node, uint64 indexed epochId)",
        "EpochAmended(address indexed node, uint64 indexed epochId, bytes32 rewardsRoot, uint256 rewardsTotal, "
        "bytes32 receiptsRoot, uint64 receiptCount, uint64 unlockAt, uint64 droppedThrough)",
        "Claimed(address indexed node, address indexed account, uint64 indexed epochId, uint256 amount, "
        "uint256 cumulativeAmount)",
    ),
    # the x402 channel contract (docs/x402.md); its names that repeat ours get a `Channel` prefix here
    Role.X402_CHANNELS: (
        "ChannelCreated(bytes32 indexed channelId, "
        "(address,address,address,address,address,uint40,bytes32) config)",
        "Deposited(bytes32 indexed channelId, address indexed payer, uint128 amount, uint128 balance)",
        "Claimed(bytes32 indexed channelId, address indexed receiver, uint128 totalClaimed, uint128 amount)",
        "Refunded(bytes32 indexed channelId, uint128 amount, uint256 nextNonce)",
        "WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint256 readyAt)",
        "Withdrawn(bytes32 indexed channelId, uint128 amount)",
    ),
}
PREFIXED = frozenset({Role.X402_CHANNELS})  # their events are named `Channel<Event>` in the mirror


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    indexed: bool


@dataclass(frozen=True)
class EventSpec:
    name: str  # unique across roles: the mirror's name for it
    role: Role
    params: tuple[Param, ...]
    event: str = ""  # the contract's name, when it differs from `name`

    @property
    def canonical(self) -> str:
        return f"{self.event or self.name}({','.join(p.type for p in self.params)})"

    @property
    def topic0(self) -> str:
        return to_hex(keccak(text=self.canonical))


def parse_signature(signature: str, role: Role) -> EventSpec:
    m = re.fullmatch(r"(\w+)\((.*)\)", signature.strip())
    if not m:
        raise ValueError(f"not an event signature: {signature!r}")
    params = []
    for part in split_types(m.group(2)):
        words = part.split()
        params.append(Param(name=words[-1], type=words[0], indexed="indexed" in words[1:-1]))
    event = m.group(1)
    if role in PREFIXED and not event.startswith("Channel"):
        return EventSpec("Channel" + event, role, tuple(params), event)
    return EventSpec(event, role, tuple(params))


def split_types(text: str) -> list[str]:
    """`text` split at its top-level commas (a tuple type keeps its own)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


_FAST_TYPES = frozenset({"address", "bytes32", "string", "uint16", "uint32", "uint64", "uint128", "uint256",
                         "uint16[]", "uint256[]"})
SPECS: tuple[EventSpec, ...] = tuple(
    parse_signature(s, role) for role, sigs in SIGNATURES.items() for s in sigs)
BY_TOPIC: dict[str, EventSpec] = {spec.topic0: spec for spec in SPECS}
BY_NAME: dict[str, EventSpec] = {spec.name: spec for spec in SPECS}


@dataclass(frozen=True)
class ChainEvent:
    """One decoded log. `(chain_id, tx_hash, log_index)` identifies it."""

    chain_id: int
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    address: str
    name: str
    args: Mapping[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        return (self.block_number, self.log_index)


def _from_topic(topic: str, typ: str) -> Any:
    if typ == "address":
        return "0x" + topic[-40:].lower()
    if typ.startswith(("uint", "int")):
        return int(topic, 16)
    return topic.lower()


def _normalise(value: Any, typ: str) -> Any:
    if typ.startswith("("):
        return tuple(_normalise(v, t) for v, t in zip(value, split_types(typ[1:-1]), strict=True))
    if typ.endswith("[]"):
        return tuple(_normalise(v, typ[:-2]) for v in value)
    if typ == "address":
        return value.lower()
    if typ.startswith("bytes"):
        return to_hex(bytes(value))
    if typ == "string":
        return str(value).replace("\x00", "\ufffd")  # as `mirror_text`
    return value


def mirror_text(raw: bytes) -> str:
    """An event's string as the mirror stores it: bytes that are not UTF-8, and NUL, become U+FFFD.
    The registries take any bytes for a uri, and PostgreSQL text refuses NUL: stored as it was, one
    stranger's registration would stop the indexer (and with it every paid request) for good."""
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def decode_data(types: Sequence[str], data: bytes) -> list[Any]:
    """ABI-decode `data` for the few types our events use (uint<N>, address, bytes32, string,
    uint<N>[]), straight from the 32-byte words: several times faster than eth_abi's generic path.
    Other types fall back to eth_abi."""
    if not set(types) <= _FAST_TYPES:
        return [_normalise(v, t) for v, t in zip(abi_decode(list(types), data), types, strict=True)]
    out: list[Any] = []
    for i, t in enumerate(types):
        word = data[32 * i:32 * i + 32]
        if len(word) != 32:
            raise ValueError(f"data too short for {t} at word {i}")
        if t == "address":
            out.append(to_hex(word[12:]))
        elif t == "bytes32":
            out.append(to_hex(word))
        elif t == "string":
            start, size = _dynamic(data, word, 1)
            out.append(mirror_text(data[start:start + size]))
        elif t.endswith("[]"):
            start, size = _dynamic(data, word, 32)
            out.append(tuple(int.from_bytes(data[start + 32 * j:start + 32 * j + 32]) for j in range(size)))
        else:
            out.append(int.from_bytes(word))
    return out


def _dynamic(data: bytes, head: bytes, width: int) -> tuple[int, int]:
    """(start, length) of the dynamic value `head` points at; `width` bytes per element."""
    offset = int.from_bytes(head)
    size = int.from_bytes(data[offset:offset + 32])
    if offset + 32 > len(data) or offset + 32 + size * width > len(data):
        raise ValueError("dynamic value runs past the data")
    return offset + 32, size


def decode_log(log: Mapping[str, Any], chain_id: int) -> ChainEvent | None:
    """Decode a raw `eth_getLogs` entry; None for a log that is not one of ours."""
    topics = [normalize(t) for t in log["topics"]]
    spec = BY_TOPIC.get(topics[0]) if topics else None
    if spec is None:
        return None
    indexed = [p for p in spec.params if p.indexed]
    plain = [p for p in spec.params if not p.indexed]
    if len(topics) != len(indexed) + 1:
        raise ChainError("log topics do not match the event", event=spec.name, topics=len(topics))
    args: dict[str, Any] = {p.name: _from_topic(t, p.type) for p, t in zip(indexed, topics[1:], strict=True)}
    data = from_hex(normalize(log["data"]))
    types = [p.type for p in plain]
    try:
        values = decode_data(types, data)
    except (IndexError, ValueError) as e:
        raise ChainError("log data does not decode", event=spec.name, error=str(e)) from e
    for p, v in zip(plain, values, strict=True):
        args[p.name] = v
    return ChainEvent(chain_id=chain_id, block_number=_int(log["blockNumber"]),
                      block_hash=normalize(log["blockHash"]), tx_hash=normalize(log["transactionHash"]),
                      log_index=_int(log["logIndex"]),
                      address=normalize(log["address"]), name=spec.name, args=args)


def _int(value: int | str) -> int:
    return value if isinstance(value, int) else int(value, 16)


def args_to_json(args: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe args: ints as decimal strings (uint256 exceeds JSON numbers), tuples as lists."""
    return {k: _jsonable(v) for k, v in args.items()}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return str(v) if isinstance(v, int) else v


def args_from_json(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    types = {p.name: p.type for p in BY_NAME[name].params}
    return {k: _typed(v, types[k]) for k, v in data.items()}


def _typed(v: Any, typ: str) -> Any:
    if typ.startswith("("):
        return tuple(_typed(x, t) for x, t in zip(v, split_types(typ[1:-1]), strict=True))
    if typ.endswith("[]"):
        return tuple(_typed(x, typ[:-2]) for x in v)
    return int(v) if typ.startswith(("uint", "int")) else v
