"""A reorg during settlement: the block holding an epoch's `settle` is replaced by one without it while
the epoch waits for finality. The transaction manager sends the same signed transaction again, the
epoch is confirmed in another block and settles once (one settle transaction per epoch); the
indexer rolls its mirror back and forward; every invariant holds."""

from __future__ import annotations

import pytest
from hexbytes import HexBytes
from sqlalchemy import select

from node.db.models import EpochState, TxIntent
from node.settlement.outbox import intent_key
from tests.e2e.cluster import OPERATOR, Cluster
from tests.e2e.traffic import ClientLog
from tests.faults.steps import settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_a_settle_reorged_out_is_sent_again_and_the_epoch_settles_once(
        cluster: Cluster, client_log: ClientLog) -> None:
    cluster.wait_settled()
    cluster.procs["worker"].stop()
    epoch_id = max(cluster.epochs(), default=0) + 1
    traffic(cluster, client_log, per_lane=1)
    settlement = cluster.contracts(OPERATOR).settlement
    with cluster.miner.paused():  # no block but the settle's: the epoch stays CONFIRMED, short of final
        cluster.start("worker")
        cluster.wait_for(lambda: cluster.epochs().get(epoch_id) is EpochState.CONFIRMED, "the settle mined")

        def mined_hash() -> str | None:  # the mirror confirms the epoch from the chain's event, maybe
            with cluster.factory() as session:  # before the worker's next poll records its receipt
                return session.scalars(select(TxIntent.mined_hash)
                                       .where(TxIntent.key == intent_key(cluster.node, epoch_id))).one()
        cluster.wait_for(lambda: mined_hash() is not None, "the worker saw its settle mined")
        tx_hash = mined_hash()
        mined = cluster.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        head = cluster.w3.eth.block_number
        assert mined["blockNumber"] == head and settlement.last_epoch(cluster.node) == epoch_id
        cluster.anvil.rpc("anvil_reorg", head - mined["blockNumber"] + 1, [])
        replaced = cluster.w3.eth.get_block(mined["blockNumber"])
        assert replaced["hash"] != mined["blockHash"] and HexBytes(tx_hash) not in replaced["transactions"]
    summary = settled_and_whole(cluster, client_log)
    remined = cluster.w3.eth.get_transaction_receipt(HexBytes(tx_hash))  # the same signed bytes, mined again
    assert remined["blockHash"] != mined["blockHash"] and remined["status"] == 1
    assert summary.num_final_epochs == epoch_id and settlement.last_epoch(cluster.node) == epoch_id
