"""`make demo`: the whole loop on embedded defaults, narrated.

Three contributors register datasets, two adapter owners train adapters on them and register the
lineage, the node serves them, a dApp deposits and sends paid requests through the official OpenAI
client on two lanes while an agent pays with the stock x402 SDK (batch-settlement), an epoch settles on
chain, every payee claims, and the demo reconciles what the chain paid with the receipts of both payers
to the wei.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from node.client.payer import Payer, verify_receipt
from node.db import queries
from node.db.session import make_engine, session_factory
from node.devkit import make_tiny_model, train_tiny_adapter
from node.devkit.corpus import STYLES
from node.devkit.demo_x402 import AgentRun, agent_line, run_agent, x402_router
from node.devkit.local_node import FIRST_USER, OPERATOR, TREASURY, LocalNode
from node.errors import ChainError
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from node.settlement.claims import claim
from node.settlement.split import Lineage, SplitParams, split_receipts

TOKEN = 10**18
CONTRIBUTORS = {"alice": FIRST_USER, "bob": FIRST_USER + 1, "carol": FIRST_USER + 2}
OWNERS = {"dave": FIRST_USER + 3, "erin": FIRST_USER + 4}
PAYER = FIRST_USER + 5
DATASETS = {"alice": "sea", "bob": "food", "carol": "stars"}
ADAPTERS = {"dave": (("alice", 7_000), ("bob", 3_000)), "erin": (("bob", 5_000), ("carol", 5_000))}
PROMPTS = ("the sea", "bread and", "stars over", "the harbour", "soup with", "the night sky")


@dataclass
class DemoResult:
    node: LocalNode
    dataset_ids: dict[str, int] = field(default_factory=dict)
    adapter_ids: dict[str, int] = field(default_factory=dict)
    receipts: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # address (lower) -> who


Say = Callable[[str], None]


def build_world(node: LocalNode, data_dir: Path, say: Say) -> tuple[DemoResult, Path]:
    result = DemoResult(node)
    roles = {**CONTRIBUTORS, **OWNERS, "dApp": PAYER, "node": OPERATOR, "treasury": TREASURY}
    result.names = {node.contracts(i).client.address.lower(): who for who, i in roles.items()}
    say("making a tiny Llama-shaped base model (random weights, a tokenizer trained on a few KB)")
    model = make_tiny_model(data_dir / "base-model")
    for who, style in DATASETS.items():
        path = data_dir / "datasets" / f"{who}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STYLES[style])
        c = node.contracts(CONTRIBUTORS[who])
        result.dataset_ids[who] = c.datasets.register(dataset_content_hash(path), path.as_uri(), c.client.address)
        say(f"{who} registered dataset {result.dataset_ids[who]} ({style} texts)")
    for owner, lineage in ADAPTERS.items():
        texts = [STYLES[DATASETS[who]] for who, _ in lineage]
        out = data_dir / "trained-adapters" / owner
        with warnings.catch_warnings():  # transformers' deprecation chatter from inside peft
            warnings.simplefilter("ignore", FutureWarning)
            trained = train_tiny_adapter(model, out, texts, rank=8, alpha=16, steps=8, lr=5e-3, seed=len(owner))
        c = node.contracts(OWNERS[owner])
        ids = [result.dataset_ids[who] for who, _ in lineage]
        result.adapter_ids[owner] = c.adapters.register(base_model_id(model), adapter_weights_sha256(out),
                                                        out.as_uri(), ids, [w for _, w in lineage], 2_000)
        say(f"{owner} trained adapter {result.adapter_ids[owner]} on datasets {ids} (loss "
            f"{trained.losses[0]:.2f} -> {trained.losses[-1]:.2f}) and registered its lineage")
    return result, model


def send_requests(result: DemoResult, num_per_lane: int, say: Say) -> None:
    node = result.node
    payer_contracts = node.contracts(PAYER)
    payer_contracts.token.mint(payer_contracts.client.address, 100 * TOKEN)
    payer_contracts.escrow.deposit(node.contracts(0).client.address, 100 * TOKEN, payer_contracts.token)
    node.wait_for_mirror()
    say("the dApp deposited 100 tokens in escrow for the node")
    payer = Payer(node.anvil.keys[PAYER], node.base_url)
    adapters = list(result.adapter_ids.values())
    lock = threading.Lock()

    def lane_worker(lane: int) -> None:
        client = payer.openai(lane=lane)
        for i in range(num_per_lane):
            out = client.chat.completions.create(
                model=str(adapters[(i + lane) % len(adapters)]), max_tokens=12,
                messages=[{"role": "user", "content": PROMPTS[(i + lane) % len(PROMPTS)]}])
            receipt = out.model_extra["receipt"]
            assert verify_receipt(receipt, payer.info.domain) == payer.info.node
            with lock:
                result.receipts.append(receipt)

    agent: list[AgentRun] = []  # the x402 payer, at the same time

    def agent_worker() -> None:
        names = [str(a) for a in adapters]
        agent.append(run_agent(node, payer.info, names, PROMPTS, max(num_per_lane // 2, 3), 100 * TOKEN))

    threads = [threading.Thread(target=lane_worker, args=(lane,)) for lane in (0, 1)]
    threads.append(threading.Thread(target=agent_worker))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    total = sum(int(r["fee"]) for r in result.receipts)
    say(f"{len(result.receipts)} paid requests through the OpenAI client on 2 lanes in "
        f"{seconds:.1f}s; every receipt verified; fees {total / TOKEN:.6f} tokens")
    if not agent:
        raise ChainError("the x402 payer did not finish (see the error above)")
    say(agent_line(agent[0], seconds, TOKEN))
    result.receipts += agent[0].receipts


def settle_and_claim(result: DemoResult, log_dir: Path, say: Say, timeout_s: float = 120.0) -> dict[str, int]:
    """The Celery worker and beat settle an epoch; then every payee claims with its own key."""
    node = result.node
    node.start_settlement(log_dir, epoch_max_age_s=1.0, settlement_interval_s=1.0)
    say("started `loranode worker` and `loranode beat` (Celery on the embedded SQLite broker)")
    operator = node.contracts(OPERATOR)
    me = operator.client.address
    deadline = time.monotonic() + timeout_s
    while operator.settlement.last_epoch(me) < 1 or not operator.settlement.is_claimable(me, 1) \
            or not _published(node):
        if time.monotonic() > deadline:
            raise ChainError("no epoch settled in time", logs=str(log_dir))
        time.sleep(0.5)
    epoch = operator.settlement.epoch(me, 1)
    say(f"epoch 1 settled on chain: {epoch.receipt_count} receipts, rewards total "
        f"{epoch.rewards_total / TOKEN:.6f} tokens, rewards root 0x{epoch.rewards_root.hex()[:16]}...")
    paid = {}
    for index in (*CONTRIBUTORS.values(), *OWNERS.values(), OPERATOR, TREASURY):
        c = node.contracts(index)
        before = c.token.balance_of(c.client.address)
        claim(c, me, c.client.address, node.base_url)
        paid[c.client.address.lower()] = c.token.balance_of(c.client.address) - before
    say(f"{len(paid)} payees claimed with proofs from GET /v1/epochs (each sent its own claim)")
    return paid


def _published(node: LocalNode) -> bool:
    with httpx.Client(base_url=node.base_url, timeout=10) as http:
        me = node.contracts(OPERATOR).client.address
        return http.get(f"/v1/epochs/{me}/latest").status_code == 200


def expected_split(result: DemoResult) -> Counter[str]:
    """Every payee's share of the receipts, recomputed from the registry mirror and the deployment."""
    node = result.node
    dep = node.deployment
    factory = session_factory(make_engine(node.settings.resolved_database_url(), pooled=False))
    lineages: dict[str, Lineage] = {}
    with factory() as session:
        for adapter_id in result.adapter_ids.values():
            view = queries.adapter_lineage(session, adapter_id)
            assert view is not None
            lineages[str(adapter_id)] = Lineage(view.owner, view.owner_share_bps,
                                                tuple((d.payout, d.weight_bps) for d in view.datasets))
    params = SplitParams(treasury=dep.treasury.lower(), node=node.contracts(OPERATOR).client.address.lower(),
                         protocol_bps=dep.protocol_bps, node_bps=dep.node_bps)
    fees = ((int(r["fee"]), str(int(r["adapterId"], 16))) for r in result.receipts)
    return Counter({k.lower(): v for k, v in split_receipts(fees, lineages, params).items()})


def report(result: DemoResult, paid: dict[str, int], say: Say) -> bool:
    expected = expected_split(result)
    table = Table(title="who earned what (claimed on chain vs. recomputed from the receipts)")
    for col in ("payee", "address", "claimed (wei)", "from receipts (wei)", ""):
        table.add_column(col, justify="right" if "wei" in col else "left")
    ok = True
    for address in sorted(set(expected) | set(paid), key=lambda a: result.names.get(a, a)):
        same = expected.get(address, 0) == paid.get(address, 0)
        ok &= same
        table.add_row(result.names.get(address, "?"), address[:10] + "...", str(paid.get(address, 0)),
                      str(expected.get(address, 0)), "ok" if same else "MISMATCH")
    fees = sum(int(r["fee"]) for r in result.receipts)
    table.add_row("total", "", str(sum(paid.values())), str(fees), "ok" if sum(paid.values()) == fees else "MISMATCH")
    Console(soft_wrap=True).print(table)
    say("reconciled to the wei" if ok and sum(paid.values()) == fees else "RECONCILIATION FAILED")
    return ok and sum(paid.values()) == fees


def show_receipt(result: DemoResult, say: Say) -> None:
    receipt = result.receipts[0]
    with httpx.Client(base_url=result.node.base_url, timeout=10) as http:
        proof = http.get(f"/v1/receipts/{receipt['id']}/proof").json()
    say("one receipt, as the dApp got it, and its proof in the epoch's receipts tree:")
    Console(soft_wrap=True).print_json(json.dumps({"receipt": receipt, "proof": proof}))


# README.md's "Try it by hand", shell 1: `make demo` never put `loranode` on the shell's PATH
NEXT = ("Next: `. .venv/bin/activate` then `loranode dev --port 8000 --epoch-max-age 5` keeps a node running "
        "(README.md, \"Try it by hand\", says what to do in a second shell); README.md has the guides for "
        "contributors, adapter owners, operators and dApps.")


def run_demo(data_dir: Path, say: Say, num_per_lane: int = 12) -> bool:
    """The whole loop from an empty data folder; True when the chain and the receipts agree."""
    started = time.monotonic()
    node = LocalNode.start_chain(data_dir, prompt_token_price=10**12, completion_token_price=2 * 10**12,
                                 default_max_tokens=12)
    try:
        say(f"anvil on {node.anvil.rpc_url}; contracts deployed (settlement {node.deployment.settlement})")
        result, model = build_world(node, data_dir, say)
        router = x402_router(node)
        node.wait_for_mirror()
        say(f"the indexer mirrored the registries; the node serves at {node.serve(model, x402_router=router)}, "
            f"taking lane vouchers and x402 batch-settlement (router {router})")
        send_requests(result, num_per_lane, say)
        paid = settle_and_claim(result, data_dir / "logs", say)
        ok = report(result, paid, say)
        show_receipt(result, say)
        say(f"done in {time.monotonic() - started:.0f}s. {NEXT}")
        return ok
    finally:
        node.stop()
