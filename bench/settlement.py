"""Settlement benchmark: gas of `settle` and `claim` on anvil, and the time to build an epoch's trees.

    python bench/settlement.py            # trees for 1,000,000 receipts
    python bench/settlement.py --quick    # trees for 100,000 receipts

- settle gas: one `settle` per (vouchers, receipts) with 1, 10 and 100 vouchers (lanes of 10 funded
  payers) and the roots of real trees over 1,000 and 100,000 synthetic receipts; the receipts and
  payees only enter as two roots and a count, so the gas must not depend on them;
- claim gas: `claim` of one payee, and `claimMany` of every payee, against the last epoch;
- x402 batch-settlement: gas per claimed channel when the node's router claims and sweeps 100 channels
  in one `collect` (payers: the `x402` SDK, deposits submitted by the node), plus the one `settle` of the
  router lane that brings them into the epoch, against `settle` per lane with 100 lane vouchers today;
- tree build: `build_epoch` (lanes, the exact split of every fee, the cumulative rewards tree, the
  receipts tree) over N receipts from 1,000 payers x 4 lanes, 50 adapters, 200 datasets; baseline in
  the same run: the same N receipts' leaves hashed with eth_abi + eth_hash (what a naive build costs).
Prints a table and writes bench/results/settlement.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

from eth_abi import encode
from eth_account import Account
from eth_hash.auto import keccak

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.contracts import ClaimRequest, Contracts
from node.chain.deploy import deploy_all
from node.chain.x402_channels import ClaimRow, X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.payment.x402.terms import X402Terms, payment_required
from node.payment.x402.wire import decode_payment
from node.protocol.receipt import LEAF_TYPES, Receipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher, Voucher, sign_voucher
from node.settlement.epoch_builder import EpochReceipt, build_epoch, rewards_tree
from node.settlement.split import Lineage, SplitParams

RESULTS = Path(__file__).resolve().parent / "results" / "settlement.json"
NUM_PAYERS = 10


def synthetic_receipts(n: int, node: str, seed: int = 0) -> tuple[list[EpochReceipt], dict[int, Lineage]]:
    rng = random.Random(seed)
    datasets = ["0x" + rng.randbytes(20).hex() for _ in range(200)]
    lineages = {}
    for a in range(50):
        picks = rng.sample(datasets, 3)
        lineages[a + 1] = Lineage("0x" + rng.randbytes(20).hex(), 1_000 + 10 * a,
                                  ((picks[0], 5_000), (picks[1], 3_000), (picks[2], 2_000)))
    payers = ["0x" + rng.randbytes(20).hex() for _ in range(1_000)]
    charged: dict[tuple[int, int], int] = {}
    out = []
    for i in range(n):
        p, lane, fee = rng.randrange(1_000), rng.randrange(4), rng.randrange(10**12, 10**15)
        charged[(p, lane)] = charged.get((p, lane), 0) + fee
        v = SignedVoucher(payers[p], node, lane, charged[(p, lane)], b"\xab" * 32, 4_000_000_000, b"")
        signed = Receipt(rng.randbytes(32), adapter_id_bytes(rng.randrange(1, 51)), 1_000, b"\xee" * 32,
                         rng.randrange(1, 4_000), rng.randrange(1, 1_000), fee, b"\xcd" * 32, 1)
        out.append(EpochReceipt(i, signed, v))
    return out, lineages


def time_build(n: int, params: SplitParams) -> dict[str, float]:
    receipts, lineages = synthetic_receipts(n, params.node)
    started = time.perf_counter()
    build = build_epoch(receipts, lineages, params, {}, 0)
    build_s = time.perf_counter() - started
    sample = receipts[: min(n, 100_000)]
    started = time.perf_counter()
    for r in sample:
        keccak(keccak(encode(list(LEAF_TYPES), list(r.receipt.values()))))
    naive_s = (time.perf_counter() - started) * n / len(sample)
    return {"receipts": n, "payees": len(build.rewards), "lanes": len(build.lanes), "build_s": round(build_s, 2),
            "naive_receipt_leaves_s": round(naive_s, 2), "speedup_vs_naive_leaves": round(naive_s / build_s, 2)}


def funded_payers(anvil: Anvil, ops: Contracts) -> list[Contracts]:
    payers = []
    for key in anvil.keys[3:3 + NUM_PAYERS]:
        c = ops.as_signer(key)
        c.token.mint(c.client.address, 10**24)
        c.escrow.deposit(ops.client.address, 10**24, c.token)
        payers.append(c)
    return payers


def settle_gas(ops: Contracts, payers: list[Contracts], epoch_id: int, num_vouchers: int, rewards_root: bytes,
               receipts_root: bytes, receipt_count: int, total: int) -> tuple[int, int]:
    """Settle `num_vouchers` fresh lanes of 1,000 each with the given roots; returns (gas, new total)."""
    node, domain, vouchers = ops.client.address, ops.settlement.domain(), []
    deadline = int(ops.client.w3.eth.get_block("latest")["timestamp"]) + 3_600  # type: ignore[typeddict-item]
    for i in range(num_vouchers):
        payer = payers[i % len(payers)]
        v = Voucher(payer.client.address, node, 1_000 * epoch_id + i, 1_000, keccak(b"%d" % i), deadline)
        vouchers.append(SignedVoucher.of(v, sign_voucher(payer.client.account.key, v, domain)))  # type: ignore[union-attr]
    total += 1_000 * num_vouchers
    receipt = ops.settlement.settle(epoch_id, vouchers, [1_000] * num_vouchers, rewards_root, total,
                                    receipts_root, receipt_count)
    return int(receipt["gasUsed"]), total


def scaled(cumulative: dict[str, int], total: int, node: str) -> dict[str, int]:
    """The same payees with amounts scaled to add up to `total` exactly (floors, dust to the node)."""
    weight = sum(cumulative.values())
    out = {a: v * total // weight for a, v in cumulative.items()}
    out[node] = out.get(node, 0) + total - sum(out.values())
    return out


def chain_part(params_bps: tuple[int, int]) -> dict[str, object]:
    rows: list[dict[str, int]] = []
    with Anvil(num_accounts=3 + NUM_PAYERS) as anvil:
        keys = anvil.keys
        node, treasury = Account.from_key(keys[0]).address, Account.from_key(keys[2]).address
        dep = deploy_all(anvil.rpc_url, keys[0], guardian=Account.from_key(keys[1]).address, treasury=treasury,
                         protocol_bps=params_bps[0], node_bps=params_bps[1], thaw_period_s=3_600,
                         challenge_period_s=0)
        ops = Contracts.connect(anvil.rpc_url, dep, keys[0])
        payers = funded_payers(anvil, ops)
        params = SplitParams(treasury, node, *params_bps)
        epoch_id, total, build = 1, 0, None
        first = rewards_tree({node: 1_000}, node)  # a warm-up epoch: first writes of the pot's slots
        _, total = settle_gas(ops, payers, epoch_id, 1, first.root, first.root, 1, total)
        for num_receipts in (1_000, 100_000):
            receipts, lineages = synthetic_receipts(num_receipts, node, seed=num_receipts)
            build = build_epoch(receipts, lineages, params, {}, 0)
            for num_vouchers in (1, 10, 100):  # every voucher opens a new lane (a cold `collected` slot)
                epoch_id += 1
                gas, total = settle_gas(ops, payers, epoch_id, num_vouchers, build.rewards.root, build.receipts.root,
                                        build.receipt_count, total)
                rows.append({"receipts": num_receipts, "vouchers": num_vouchers, "settle_gas": gas})
        assert build is not None
        # a last epoch whose tree holds the 100,000-receipt epoch's payees with what the pot really has
        epoch_id += 1
        tree = rewards_tree(scaled(build.cumulative, total + 1_000, node), node)
        settle_gas(ops, payers, epoch_id, 1, tree.root, build.receipts.root, build.receipt_count, total)
        account, amount = tree.values[0]
        one = ops.settlement.claim(node, epoch_id, account, int(amount), tree.proof(0))
        claims = [ClaimRequest(node, epoch_id, a, int(v), tuple(tree.proof(i)))
                  for i, (a, v) in enumerate(tree.values) if i > 0 and int(v) > 0]
        many = ops.settlement.claim_many(claims)
        return {"settle": rows, "claim_gas": int(one["gasUsed"]), "claim_many_gas": int(many["gasUsed"]),
                "claim_many_payees": len(claims), "payees_in_tree": len(tree)}


def x402_part(num_channels: int = 100, price: int = 3_000) -> dict[str, object]:
    """Gas of the router's `collect` (claim + sweep + escrow deposit) over `num_channels` fresh channels, each
    funded through the SDK, and of the `settle` that collects the router's lane (one voucher, ERC-1271)."""
    from x402 import x402ClientSync
    from x402.http.utils import encode_payment_signature_header
    from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
    from x402.schemas import PaymentRequired

    with Anvil(num_accounts=3) as anvil:
        keys = anvil.keys
        node = Account.from_key(keys[0]).address
        dep = deploy_all(anvil.rpc_url, keys[0], guardian=node, treasury=Account.from_key(keys[2]).address,
                         protocol_bps=500, node_bps=1_500, thaw_period_s=3_600, challenge_period_s=0)
        ops = Contracts.connect(anvil.rpc_url, dep, keys[0])
        client = ContractClient(anvil.rpc_url, keys[0])
        ensure_channel_contracts(client)
        router = deploy_router(client, node, dep.escrow)
        terms = X402Terms(dep.chain_id, dep.token, *token_domain(client, dep.token), router, node, 86_400)
        required = PaymentRequired.model_validate(payment_required("http://bench/x", [terms.requirements(price)]))
        chain, rows = X402Chain(client, router), []
        for i in range(num_channels + 1):  # payers need no gas: the node submits their ERC-3009 deposits
            payer = Account.from_key(keccak(b"x402 bench payer %d" % i))
            ops.token.mint(payer.address, 10**18)
            sdk = x402ClientSync().register(terms.network, BatchSettlementEvmScheme(payer))
            sdk.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
            payment = decode_payment(encode_payment_signature_header(sdk.create_payment_payload(required)))
            chain.deposit(payment)
            rows.append(ClaimRow(payment.config, payment.voucher.max_claimable, payment.voucher.signature, price))
        gas = [_router_epoch(ops, chain, keys[0], epoch, rows[:1] if epoch == 1 else rows[1:]) for epoch in (1, 2)]
        (collect, settle) = gas[1]  # epoch 1 warmed the pot and the router's slots, as chain_part's first epoch
        return {"channels": num_channels, "collect_gas": collect, "router_settle_gas": settle,
                "gas_per_channel": (collect + settle) // num_channels}


def _router_epoch(ops: Contracts, chain: X402Chain, node_key: str, epoch_id: int,
                  rows: list[ClaimRow]) -> tuple[int, int]:
    """The router claims and sweeps `rows`, then `settle` collects them as one fresh router lane:
    (collect gas, settle gas)."""
    assert chain.router is not None
    node, router, amount = ops.client.address, chain.router.address, sum(r.total_claimed for r in rows)
    collect = chain.collect(rows)
    lane = Voucher(router, node, epoch_id, amount, keccak(b"router lane %d" % epoch_id), 2**40)
    total = ops.settlement.rewards_total(node) + amount
    tree = rewards_tree({node: total}, node)
    voucher = SignedVoucher.of(lane, sign_voucher(node_key, lane, ops.settlement.domain()))
    settle = ops.settlement.settle(epoch_id, [voucher], [amount], tree.root, total, tree.root, len(rows))
    return int(collect["gasUsed"]), int(settle["gasUsed"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 100_000 if args.quick else 1_000_000
    chain = chain_part((500, 1_500))
    x402 = x402_part()
    tree = time_build(n, SplitParams("0x" + "11" * 20, "0x" + "22" * 20, 500, 1_500))
    print(f"{'receipts':>9} {'vouchers':>8} {'settle gas':>11}")
    for r in chain["settle"]:  # type: ignore[attr-defined]
        print(f"{r['receipts']:>9,} {r['vouchers']:>8} {r['settle_gas']:>11,}")
    lanes_100 = next(r["settle_gas"] for r in chain["settle"] if r["vouchers"] == 100  # type: ignore[attr-defined]
                     and r["receipts"] == 100_000)
    x402["lane_settle_gas_per_lane"] = lanes_100 // 100
    x402["ratio_to_lane"] = round(x402["gas_per_channel"] / x402["lane_settle_gas_per_lane"], 3)  # type: ignore[operator]
    print(f"x402: collect {x402['channels']} channels {x402['collect_gas']:,} + settle the router lane "
          f"{x402['router_settle_gas']:,} = {x402['gas_per_channel']:,} per channel; lanes: settle 100 = "
          f"{lanes_100:,} = {x402['lane_settle_gas_per_lane']:,} per lane (x{x402['ratio_to_lane']})")
    print(f"claim gas (one payee, {chain['payees_in_tree']} in the tree): {chain['claim_gas']:,}")
    print(f"claimMany gas ({chain['claim_many_payees']} payees): {chain['claim_many_gas']:,}")
    print(f"build trees for {tree['receipts']:,} receipts ({tree['payees']} payees, {tree['lanes']} lanes): "
          f"{tree['build_s']} s (target < 60 s); naive receipt leaves alone: {tree['naive_receipt_leaves_s']} s "
          f"(x{tree['speedup_vs_naive_leaves']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "quick": args.quick,
                                   "chain": chain, "x402": x402, "trees": tree}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
