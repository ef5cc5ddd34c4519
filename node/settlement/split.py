"""The money split: integers only, floors everywhere, the dust to the node.

For each receipt's fee, in this order (DESIGN.md, "Money split"), with the dataset weights the receipt
commits to (its adapter's lineage for method 1, the receipt's own blended weights for method 2):
    protocol = fee * protocol_bps // 10_000                       -> treasury
    node     = fee * node_bps // 10_000                           -> node
    rest     = fee - protocol - node
    owner    = rest * owner_share_bps // 10_000                   -> adapter owner
    pool     = rest - owner
    share_i  = pool * weight_bps_i // 10_000 for each dataset i   -> dataset i's payout address
    dust     = pool - sum(share_i)                                -> node
so the shares of one fee always add up to the fee exactly. Payees are addresses; one address can
hold several roles and its amounts add up. A receipt for the base model alone (adapterId 0) has
BASE_LINEAGE: no owner share and no datasets, so the node gets all but the protocol's share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BPS = 10_000


@dataclass(frozen=True)
class SplitParams:
    treasury: str
    node: str
    protocol_bps: int
    node_bps: int

    def __post_init__(self) -> None:
        if not (0 <= self.protocol_bps and 0 <= self.node_bps and self.protocol_bps + self.node_bps <= BPS):
            raise ValueError(f"protocol_bps {self.protocol_bps} + node_bps {self.node_bps} must be in [0, {BPS}]")


@dataclass(frozen=True)
class Lineage:
    """An adapter's payees: its owner's share and its datasets' payout addresses with weights (bps)."""

    owner: str
    owner_share_bps: int
    datasets: tuple[tuple[str, int], ...]  # (payout address, weight bps), weights sum to 10,000

    def __post_init__(self) -> None:
        if not 0 <= self.owner_share_bps <= BPS:
            raise ValueError(f"owner_share_bps {self.owner_share_bps} out of [0, {BPS}]")
        total = sum(w for _, w in self.datasets)
        if self.datasets and total != BPS:
            raise ValueError(f"dataset weights sum to {total}, not {BPS}")
        if any(w < 0 for _, w in self.datasets):
            raise ValueError("negative dataset weight")

    def with_weights(self, weights_bps: tuple[int, ...]) -> Lineage:
        """The same payees with one receipt's weights (method 2: the blended weights it commits to)."""
        if len(weights_bps) != len(self.datasets):
            raise ValueError(f"{len(weights_bps)} weights for {len(self.datasets)} datasets")
        return Lineage(self.owner, self.owner_share_bps,
                       tuple((payout, w) for (payout, _), w in zip(self.datasets, weights_bps, strict=True)))


ZERO_ADDRESS = "0x" + "00" * 20
# The base model served without an adapter: nobody but the treasury and the node is owed (the owner's share
# is 0 of the rest, the whole pool is dust); zero amounts never become leaves.
BASE_LINEAGE = Lineage(ZERO_ADDRESS, 0, ())


@dataclass(frozen=True)
class Share:
    """One part of a fee: who gets it and in which role (`treasury`, `node`, `owner`, or `dataset` with
    the dataset's position in the lineage)."""

    role: str
    payee: str
    amount: int
    position: int | None = None  # the dataset's index in `Lineage.datasets`, for role `dataset`


def split_shares(fee: int, params: SplitParams, lineage: Lineage) -> list[Share]:
    """The parts of one fee by role, in the order above; their amounts add up to `fee` exactly."""
    if fee < 0:
        raise ValueError(f"negative fee {fee}")
    protocol = fee * params.protocol_bps // BPS
    node = fee * params.node_bps // BPS
    rest = fee - protocol - node
    owner = rest * lineage.owner_share_bps // BPS
    pool = rest - owner
    datasets = [Share("dataset", payout, pool * weight // BPS, i)
                for i, (payout, weight) in enumerate(lineage.datasets)]
    dust = pool - sum(s.amount for s in datasets)  # no datasets: the whole pool is dust
    return [Share("treasury", params.treasury, protocol), Share("node", params.node, node + dust),
            Share("owner", lineage.owner, owner), *datasets]


def split_fee(fee: int, params: SplitParams, lineage: Lineage) -> Counter[str]:
    """Every payee's share of one fee; the values add up to `fee` exactly."""
    shares: Counter[str] = Counter()
    for share in split_shares(fee, params, lineage):
        shares[share.payee] += share.amount
    return shares


def split_receipts(fees: Iterable[tuple[int, str]], lineages: Mapping[str, Lineage],
                   params: SplitParams) -> Counter[str]:
    """Sum of `split_fee` over (fee, adapter id) pairs; zero amounts are dropped."""
    total: Counter[str] = Counter()
    cache: dict[tuple[int, str], Counter[str]] = {}
    for fee, adapter_id in fees:
        key = (fee, adapter_id)
        shares = cache.get(key)
        if shares is None:
            shares = split_fee(fee, params, lineages[adapter_id])
            if len(cache) < 65_536:
                cache[key] = shares
        total.update(shares)
    return Counter({k: v for k, v in total.items() if v})
