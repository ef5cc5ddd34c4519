"""The scheme's EIP-712 structs, hashed the way the channel contract hashes them (docs/x402.md).

Domain: name "x402 Batch Settlement", version "1", the chain id, and the channel contract at its
canonical address (the SDKs hard-code it). `channelId` is the full EIP-712 digest of a `ChannelConfig`,
so it binds the chain and the contract. Every field is a static abi type, so the structs hash with
`node.protocol.eip712` (one word per field); the ClaimBatch hashes its array of entries as EIP-712 does:
keccak256 of the concatenated entry hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from node.protocol.address import checksum_address
from node.protocol.eip712 import Domain, check_fields, digest, struct_hash, type_hash

SCHEME = "batch-settlement"
CHANNELS_ADDRESS = to_checksum_address("0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003")  # x402BatchSettlement
ERC3009_COLLECTOR_ADDRESS = to_checksum_address("0x4020806089470a89826cB9fB1f4059150b550004")  # ERC3009DepositCollector
MIN_WITHDRAW_DELAY_S = 900
MAX_WITHDRAW_DELAY_S = 2_592_000
ZERO_ADDRESS = "0x" + "00" * 20

CONFIG_FIELDS = (("payer", "address"), ("payerAuthorizer", "address"), ("receiver", "address"),
                 ("receiverAuthorizer", "address"), ("token", "address"), ("withdrawDelay", "uint40"),
                 ("salt", "bytes32"))
VOUCHER_FIELDS = (("channelId", "bytes32"), ("maxClaimableAmount", "uint128"))
REFUND_FIELDS = (("channelId", "bytes32"), ("nonce", "uint256"), ("amount", "uint128"))
CLAIM_ENTRY_FIELDS = (("channelId", "bytes32"), ("maxClaimableAmount", "uint128"), ("totalClaimed", "uint128"))
RECEIVE_FIELDS = (("from", "address"), ("to", "address"), ("value", "uint256"), ("validAfter", "uint256"),
                  ("validBefore", "uint256"), ("nonce", "bytes32"))

CONFIG_TYPEHASH = type_hash("ChannelConfig", CONFIG_FIELDS)
VOUCHER_TYPEHASH = type_hash("Voucher", VOUCHER_FIELDS)
REFUND_TYPEHASH = type_hash("Refund", REFUND_FIELDS)
CLAIM_ENTRY_TYPEHASH = type_hash("ClaimEntry", CLAIM_ENTRY_FIELDS)
CLAIM_BATCH_TYPEHASH = keccak(b"ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,"
                              b"uint128 maxClaimableAmount,uint128 totalClaimed)")
RECEIVE_TYPEHASH = type_hash("ReceiveWithAuthorization", RECEIVE_FIELDS)


def channels_domain(chain_id: int) -> Domain:
    return Domain(chain_id, CHANNELS_ADDRESS, name="x402 Batch Settlement", version="1")


@dataclass(frozen=True)
class ChannelConfig:
    """A channel's immutable identity (addresses checksummed, `salt` 32 bytes)."""

    payer: str
    payer_authorizer: str
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int
    salt: bytes

    def __post_init__(self) -> None:
        check_fields(CONFIG_FIELDS, self.values())
        for name in ("payer", "payer_authorizer", "receiver", "receiver_authorizer", "token"):
            object.__setattr__(self, name, checksum_address(getattr(self, name)))

    def values(self) -> tuple[Any, ...]:
        return (self.payer, self.payer_authorizer, self.receiver, self.receiver_authorizer, self.token,
                self.withdraw_delay, self.salt)

    def to_json(self) -> dict[str, Any]:
        return {"payer": self.payer, "payerAuthorizer": self.payer_authorizer, "receiver": self.receiver,
                "receiverAuthorizer": self.receiver_authorizer, "token": self.token,
                "withdrawDelay": self.withdraw_delay, "salt": "0x" + self.salt.hex()}

    def as_tuple(self) -> tuple[Any, ...]:
        """The struct as a contract call argument."""
        return self.values()


def channel_id(config: ChannelConfig, chain_id: int) -> bytes:
    return digest(channels_domain(chain_id), struct_hash(CONFIG_TYPEHASH, CONFIG_FIELDS, config.values()))


def voucher_digest(channel: bytes, max_claimable: int, chain_id: int) -> bytes:
    values = (channel, max_claimable)
    check_fields(VOUCHER_FIELDS, values)
    return digest(channels_domain(chain_id), struct_hash(VOUCHER_TYPEHASH, VOUCHER_FIELDS, values))


def refund_digest(channel: bytes, nonce: int, amount: int, chain_id: int) -> bytes:
    values = (channel, nonce, amount)
    check_fields(REFUND_FIELDS, values)
    return digest(channels_domain(chain_id), struct_hash(REFUND_TYPEHASH, REFUND_FIELDS, values))


def claim_batch_digest(entries: list[tuple[bytes, int, int]], chain_id: int) -> bytes:
    """`entries`: (channelId, maxClaimableAmount, totalClaimed) per row, in the batch's order."""
    hashed = b"".join(struct_hash(CLAIM_ENTRY_TYPEHASH, CLAIM_ENTRY_FIELDS, e) for e in entries)
    return digest(channels_domain(chain_id), keccak(CLAIM_BATCH_TYPEHASH + keccak(hashed)))


def deposit_nonce(channel: bytes, salt: int) -> bytes:
    """The ERC-3009 nonce of a deposit: keccak256(abi.encode(channelId, salt)); it funds that channel only."""
    return keccak(channel + salt.to_bytes(32, "big"))


def receive_digest(token_domain: Domain, payer: str, amount: int, valid_after: int, valid_before: int,
                   nonce: bytes) -> bytes:
    """The token's `ReceiveWithAuthorization` digest for a deposit through the ERC-3009 collector."""
    values = (payer, ERC3009_COLLECTOR_ADDRESS, amount, valid_after, valid_before, nonce)
    check_fields(RECEIVE_FIELDS, values)
    return digest(token_domain, struct_hash(RECEIVE_TYPEHASH, RECEIVE_FIELDS, values))
