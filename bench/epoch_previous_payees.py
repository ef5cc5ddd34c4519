"""Time to build an epoch on top of a previous tree with many payees (the step's read and build).

    python bench/epoch_previous_payees.py [--payees 200000] [--receipts 1000]

The previous epoch's rewards tree holds `--payees` payees; the new epoch has `--receipts` receipts.
Prints the seconds of `cumulative_of` (reading the previous tree) and of `build_epoch` (best of 3).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.settlement import synthetic_receipts
from node.settlement.epoch_builder import build_epoch, cumulative_of, rewards_tree
from node.settlement.split import SplitParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payees", type=int, default=200_000)
    ap.add_argument("--receipts", type=int, default=1_000)
    args = ap.parse_args()
    rng = random.Random(1)
    node, treasury = "0x" + "22" * 20, "0x" + "11" * 20
    params = SplitParams(treasury, node, 500, 1_500)
    receipts, lineages = synthetic_receipts(args.receipts, node)
    first = build_epoch(receipts, lineages, params, {}, 0)
    earlier = {("0x" + rng.randbytes(20).hex()): rng.randrange(1, 10**18) for _ in range(args.payees)}
    merged = dict(cumulative_of(rewards_tree({**earlier, **first.cumulative}, node).to_json()))
    dump = rewards_tree(merged, node).to_json()
    total = sum(merged.values())
    read_s = build_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        previous = cumulative_of(dump)
        t1 = time.perf_counter()
        build_epoch(receipts, lineages, params, previous, total)
        t2 = time.perf_counter()
        read_s, build_s = min(read_s, t1 - t0), min(build_s, t2 - t1)
    print(f"payees={len(previous)} receipts={args.receipts} cumulative_of={read_s:.2f}s build_epoch={build_s:.2f}s "
          f"both={read_s + build_s:.2f}s")


if __name__ == "__main__":
    main()
