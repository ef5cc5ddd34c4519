"""The node's chain reads of x402 channels (node/payment/x402/chain_reads.py): strangers' empty channels
cost a bounded number of reads, channels someone paid into are read as before. The attack through the
payment service is tests/payment/x402/test_rpc_flood.py."""

from __future__ import annotations

from node.payment.x402.chain_reads import EMPTY, ChannelReads, ChannelState, OnChain

FUNDED = ChannelState(balance=10**6)


class Chain:
    """Channels' states by id, counting the reads the node makes."""

    def __init__(self, funded: set[bytes] | None = None) -> None:
        self.funded = funded or set()
        self.reads: list[bytes] = []

    def __call__(self, channel: bytes) -> OnChain:
        self.reads.append(channel)
        return FUNDED if channel in self.funded else EMPTY


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_strangers_channels_cost_at_most_the_buckets_reads() -> None:
    chain, clock = Chain(), Clock()
    reads = ChannelReads(chain, reads_per_s=5.0, burst=20.0, clock=clock)
    for i in range(100):
        assert reads.get(i.to_bytes(32, "big")) == EMPTY
    assert len(chain.reads) == 20
    clock.now += 1.0
    for i in range(100, 200):
        reads.get(i.to_bytes(32, "big"))
    assert len(chain.reads) == 25, "the bucket refills at reads_per_s"
    assert reads.num_unread == 175


def test_a_channel_read_empty_is_not_read_again_for_a_while_and_memory_stays_bounded() -> None:
    chain, clock = Chain(), Clock()
    reads = ChannelReads(chain, empty_ttl_s=5.0, max_empty=3, clock=clock)
    channel = b"\x01" * 32
    for _ in range(10):
        reads.get(channel)
    assert chain.reads == [channel], "one stranger's retries cost one read"
    clock.now += 5.0
    reads.get(channel)
    assert len(chain.reads) == 2
    for i in range(10):
        reads.get(i.to_bytes(32, "big"))
    assert len(reads) == 3


def test_funded_and_known_channels_are_read_whatever_strangers_did() -> None:
    funded, known = b"\xf0" * 32, b"\xf1" * 32
    chain, clock = Chain({funded, known}), Clock()
    reads = ChannelReads(chain, ttl_s=2.0, burst=1.0, reads_per_s=0.0, clock=clock)
    assert reads.get(funded) == FUNDED  # the bucket's one read
    for i in range(50):
        reads.get(i.to_bytes(32, "big"))
    assert reads.get(known) == EMPTY, "an unknown channel waits for the bucket"
    assert reads.get(known, is_known=True) == FUNDED, "the mirror shows it funded: read"
    clock.now += 2.0
    num = len(chain.reads)
    assert reads.get(funded) == FUNDED and len(chain.reads) == num + 1, "a funded channel is read again"
    deposited = b"\xf2" * 32
    reads.deposited(deposited)  # the node's own deposit into a channel it never read
    chain.funded.add(deposited)
    assert reads.get(deposited) == FUNDED
