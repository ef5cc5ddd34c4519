"""`make demo`: the whole loop on embedded defaults, narrated.

Three contributors register datasets, two adapter owners train adapters on them and register the
lineage, the node serves them, a dApp deposits and sends paid requests through the official OpenAI
client on two lanes, an epoch settles on chain, every payee claims, and the demo reconciles what the
chain paid with the receipts to the wei.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.client.payer import Payer, verify_receipt
from node.devkit import make_tiny_model, train_tiny_adapter
from node.devkit.corpus import STYLES
from node.devkit.local_node import FIRST_USER, OPERATOR, TREASURY, LocalNode
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash

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

    threads = [threading.Thread(target=lane_worker, args=(lane,)) for lane in (0, 1)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(int(r["fee"]) for r in result.receipts)
    say(f"{len(result.receipts)} paid requests through the OpenAI client on 2 lanes in "
        f"{time.monotonic() - started:.1f}s; every receipt verified; fees {total / TOKEN:.6f} tokens")


def run_demo(data_dir: Path, say: Say, num_per_lane: int = 12) -> DemoResult:
    """The demo from an empty data folder to paid, receipted requests (and, with settlement, claims)."""
    started = time.monotonic()
    node = LocalNode.start_chain(data_dir, prompt_token_price=10**12, completion_token_price=2 * 10**12,
                                 default_max_tokens=12)
    try:
        say(f"anvil on {node.anvil.rpc_url}; contracts deployed (settlement {node.deployment.settlement})")
        result, model = build_world(node, data_dir, say)
        node.wait_for_mirror()
        say(f"the indexer mirrored the registries; the node serves at {node.serve(model)}")
        send_requests(result, num_per_lane, say)
        say(f"done in {time.monotonic() - started:.0f}s")
        return result
    finally:
        node.stop()
