"""Whether a pending settle may still land is the guardian's word alone: a veto or an amended root cancels
it (the worker replaces it with a no-op), but an RPC that fails to answer is no reason to cancel a good
settle (it would cost the node its place in line and a no-op's gas on every flaky read)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from node.db.models import EpochState, SettlementEpoch
from node.errors import RpcTransient
from node.settlement.amendment import follows_chain

NODE = "0x" + "11" * 20
ROOT = "0x" + "ab" * 32


@dataclass
class OnChain:
    rewards_root: bytes


class Chain:
    """The two views `follows_chain` reads, answering as told."""

    def __init__(self, vetoed: int = 0, root: bytes = bytes.fromhex(ROOT[2:]), fails: bool = False) -> None:
        self.vetoed, self.root, self.fails = vetoed, root, fails

    def first_vetoed_epoch(self, node: str) -> int:
        if self.fails:
            raise RpcTransient("the RPC timed out", method="eth_call")
        return self.vetoed

    def epoch(self, node: str, epoch_id: int) -> OnChain:
        return OnChain(self.root)


def _previous() -> SettlementEpoch:
    return SettlementEpoch(node=NODE, epoch_id=1, state=EpochState.FINAL, rewards_root=ROOT)


def _follows(chain: Chain) -> bool:
    return follows_chain(chain, NODE, _previous())  # type: ignore[arg-type]  # the two views of Settlement


def test_a_settle_on_the_chains_own_root_follows_it() -> None:
    assert _follows(Chain())


def test_a_veto_or_an_amended_root_means_the_settle_must_never_land() -> None:
    assert not _follows(Chain(vetoed=1))
    assert not _follows(Chain(root=b"\x01" * 32))


def test_a_failed_read_is_raised_not_taken_for_a_veto() -> None:
    with pytest.raises(RpcTransient):
        _follows(Chain(fails=True))
