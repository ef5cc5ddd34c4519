"""The steps every fault test repeats: a burst of paid traffic that must be answered, and the check
that the node is whole again (processes alive, every receipt settled, every invariant, every payee
paid exactly what it is due)."""

from __future__ import annotations

import logging

from tests.e2e.cluster import Cluster
from tests.e2e.invariants import Summary, check_invariants, claim_everything
from tests.e2e.traffic import ClientLog, burst

log = logging.getLogger(__name__)
LANES = [(payer, lane) for payer in range(3) for lane in (0, 1)]
MAX_MIRROR_LAG_S = 10.0  # the API refuses paid work once the indexer has not reached the chain this long


def traffic(cluster: Cluster, client_log: ClientLog, per_lane: int = 2) -> None:
    """A burst of paid calls on every lane of LANES; each must be answered."""
    before = len(client_log.outcomes)
    burst([cluster.payer(i) for i in range(3)], LANES, cluster.world.models, client_log, per_lane)
    new = client_log.outcomes[before:]
    assert all(o.is_served for o in new), [(o.status, o.error) for o in new if not o.is_served]


def settled_and_whole(cluster: Cluster, client_log: ClientLog) -> Summary:
    """Every process alive, every receipt in a final epoch, every invariant over the whole log, and a
    relayer's claim for every payee paying each exactly what it is due."""
    cluster.check_alive()
    cluster.wait_settled()
    summary = check_invariants(cluster, client_log)
    paid = claim_everything(cluster)
    log.info("invariants hold: %s; claims paid %d to %d payees", summary, sum(paid.values()), len(paid))
    return summary
