"""Watching settlement from any machine: `loranode epoch list|show|export`, `loranode earnings` and
`loranode status` read only the node's API (no LORANODE_* settings, no database on this side), and
say what the chain says: roots, totals, the settle transaction, each payee's earnings by source, and
what is claimed; and each adapter's real state."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from node.cli import app
from node.cli.node_api import utc_time
from node.client.payer import Payer
from node.db.loss import LossReason, LossRecord, record_loss
from node.db.models import EpochState
from node.db.session import make_engine, session_factory
from node.lora.content_hash import adapter_weights_sha256, base_model_id
from node.protocol.hexstr import to_hex
from node.settlement.claims import claim
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from node.settlement.split import Lineage, SplitParams, split_fee
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PaidNode

pytestmark = pytest.mark.chain
runner = CliRunner()
STRANGER_PAYER = "0x" + "ab" * 20
UTC_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"  # ISO 8601 UTC, as the CLI shows every time


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"LORANODE_DATA_DIR": None, "LORANODE_DATABASE_URL": None})
    return result.exit_code, result.output


def _json(*args: str) -> dict:  # type: ignore[type-arg]
    code, out = _run(*args, "--json")
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def settled(paid_node: PaidNode) -> list[int]:
    """Three paid requests on two payers' lanes, settled in epoch 1 (FINAL); their fees."""
    url = paid_node.base_url
    code, out = _run("epoch", "list", "--node-url", url)
    assert code == 0 and "no epochs yet" in out, out
    fees = []
    for i, lane in ((0, 0), (0, 0), (1, 3)):
        client = Payer(paid_node.payer_keys[i], url).openai(lane=lane)
        out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea", max_tokens=4)
        fees.append(int(out.model_extra["receipt"]["fee"]))
    service = SettlementRuntime.from_settings(paid_node.local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()
    assert service.close_epoch() == 1
    opened = _json("epoch", "show", "1", "--node-url", url)
    assert opened["state"] == "open" and opened["receiptCount"] is None and opened["rewardsRoot"] is None
    assert service.run_until_final(1, timeout_s=60) is EpochState.FINAL
    return fees


def test_epoch_list_and_show_say_what_the_chain_holds(paid_node: PaidNode, settled: list[int]) -> None:
    url, ops = paid_node.base_url, paid_node.local.contracts(0)
    on_chain = ops.settlement.epoch(ops.client.address, 1)
    code, out = _run("epoch", "list", "--node-url", url)
    assert code == 0, out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("1 "))
    assert row[:5] == ["1", "final", "3", str(sum(settled)), str(on_chain.rewards_total)]
    shown = _json("epoch", "show", "1", "--node-url", url)
    assert shown["rewardsRoot"] == to_hex(on_chain.rewards_root) and shown["receiptCount"] == 3
    assert shown["receiptsRoot"] == to_hex(on_chain.receipts_root) and shown["txHash"].startswith("0x")
    assert shown["losses"] == {"byReason": [], "recoveredHere": {"count": 0, "amount": "0"}}
    code, out = _run("epoch", "show", "latest", "--node-url", url)
    assert code == 0 and "state:         final" in out and f"rewards root:  {shown['rewardsRoot']}" in out
    times = dict(re.findall(r"^(claims|opened|final): +(?:claimable from )?(.*)$", out, re.M))
    assert set(times) == {"claims", "opened", "final"} and all(re.fullmatch(UTC_TIME, t) for t in times.values()), out
    assert times["opened"] == utc_time(shown["openedAt"]) and times["final"] == utc_time(shown["finalizedAt"])
    assert re.fullmatch(UTC_TIME, row[-1]) and row[-1] == times["opened"], row  # `epoch list` shows it the same
    code, out = _run("epoch", "show", "7", "--node-url", url)
    assert code == 2 and "no such epoch" in out


def test_earnings_show_each_payee_its_share_by_source_then_claimed(paid_node: PaidNode, settled: list[int]) -> None:
    local, url = paid_node.local, paid_node.base_url
    ops = local.contracts(0)
    contributors = [local.contracts(c).client.address for c in CONTRIBUTORS]
    owner = local.contracts(ADAPTER_OWNER).client.address
    lineage = Lineage(owner, OWNER_SHARE_BPS, tuple(zip(contributors, LINEAGE_WEIGHTS, strict=True)))
    params = SplitParams(local.deployment.treasury, ops.client.address, 500, 1_500)
    expected = {who: sum(split_fee(f, params, lineage)[who] for f in settled)
                for who in (*contributors, owner, local.deployment.treasury, ops.client.address)}
    sources = {contributors[0]: f"dataset {paid_node.dataset_ids[0]}", contributors[1]:
               f"dataset {paid_node.dataset_ids[1]}", owner: f"adapter {paid_node.adapter_id} owner",
               local.deployment.treasury: "treasury", ops.client.address: "node"}
    for who, amount in expected.items():
        doc = _json("earnings", who, "--node-url", url)
        assert doc["earned"] == doc["unclaimed"] == doc["claimableNow"] == str(amount) and amount > 0
        assert doc["bySource"] == [{"source": sources[who], "amount": str(amount)}]
        assert [(e["epochId"], e["status"]) for e in doc["epochs"]] == [(1, "claimable")]
    assert sum(expected.values()) == ops.settlement.rewards_total(ops.client.address)

    claim(ops, ops.client.address, contributors[0], url)
    deadline = time.monotonic() + 20
    while (doc := _json("earnings", contributors[0], "--node-url", url))["claimed"] == "0":
        assert time.monotonic() < deadline, "the claim never reached the node's mirror"
        time.sleep(0.2)
    assert doc["claimed"] == str(expected[contributors[0]]) and doc["unclaimed"] == "0"
    code, out = _run("earnings", contributors[0], "--node-url", url)
    assert code == 0 and f"1  final  {expected[contributors[0]]}  {expected[contributors[0]]}  claimed" in out, out
    code, out = _run("earnings", "0x" + "77" * 20, "--node-url", url)
    assert code == 0 and "earned 0" in out and "nothing earned in a settled epoch yet" in out
    code, out = _run("earnings", "alice", "--node-url", url)
    assert code == 2 and "not an address" in out


def test_epoch_losses_are_summed_per_reason_without_payers(paid_node: PaidNode, settled: list[int]) -> None:
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    node = paid_node.local.contracts(0).client.address
    with factory() as session, session.begin():
        for amount in (5, 7):
            record_loss(session, LossRecord(node, STRANGER_PAYER, 9, amount, LossReason.SETTLE_REFUSED, epoch_id=1,
                                            detail=f"refused {STRANGER_PAYER}"))
    shown = _json("epoch", "show", "1", "--node-url", paid_node.base_url)
    assert shown["losses"]["byReason"] == [{"reason": "settle_refused", "count": 2, "amount": "12",
                                            "recoveredLater": 0}]
    for path in (f"/v1/epochs/{node}/1/summary", f"/v1/epochs/{node}"):
        assert STRANGER_PAYER not in httpx.get(paid_node.base_url + path).text.lower()
    code, out = _run("epoch", "show", "1", "--node-url", paid_node.base_url)
    assert code == 0 and "settle_refused" in out and STRANGER_PAYER not in out


def test_epoch_export_reads_the_api_and_says_what_to_pass_without_a_database(
        paid_node: PaidNode, settled: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .loranode here, and no LORANODE_DATA_DIR: no local node database
    out_file = tmp_path / "epoch.json"
    code, out = _run("epoch", "export", "--node-url", paid_node.base_url, "--out", str(out_file))
    assert code == 0, out
    doc = json.loads(out_file.read_text())
    assert doc["epochId"] == 1 and doc["rewards"]["values"]
    code, out = _run("epoch", "export", "--out", str(out_file), "--node", doc["node"])
    assert code == 2 and "--node-url" in out and "unable to open database file" not in out, out


def test_status_shows_each_adapters_real_state(paid_node: PaidNode, tiny_model: Path, tiny_adapters: object) -> None:
    local, url = paid_node.local, paid_node.base_url
    owner = local.contracts(ADAPTER_OWNER)
    paths = tiny_adapters.paths  # type: ignore[attr-defined]
    base, ds = base_model_id(tiny_model), list(paid_node.dataset_ids)
    wrong = owner.adapters.register(base, adapter_weights_sha256(paths["count-r4"]), paths["sea-r8"].as_uri(), ds,
                                    list(LINEAGE_WEIGHTS), OWNER_SHARE_BPS)
    untried = owner.adapters.register(base, adapter_weights_sha256(paths["food-r16"]), paths["food-r16"].as_uri(),
                                      ds, list(LINEAGE_WEIGHTS), OWNER_SHARE_BPS)
    retired = owner.adapters.register(base, adapter_weights_sha256(paths["count-r4"]), paths["count-r4"].as_uri(),
                                      ds, list(LINEAGE_WEIGHTS), OWNER_SHARE_BPS)
    owner.adapters.deprecate(retired)
    local.wait_for_mirror()
    client = Payer(paid_node.payer_keys[1], url).openai(lane=40)
    with pytest.raises(openai.APIStatusError):
        client.completions.create(model=str(wrong), prompt="the sea", max_tokens=4)
    states = {a["id"]: a for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
    assert states[str(wrong)]["state"] == "cannot_load" and "hashes to" in states[str(wrong)]["detail"]
    assert states[str(untried)]["state"] == "serving" and "not fetched yet" in states[str(untried)]["detail"]
    assert states[str(retired)]["state"] == "deprecated"
    assert states[str(paid_node.adapter_id)]["state"] == "serving"
    code, out = _run("status", "--node-url", url)
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert "cannot_load  cannot load: adapter" in rows[str(wrong)] and "serving" not in rows[str(wrong)]
    assert "deprecated" in rows[str(retired)]
    assert f"serving {len(states) - 2} of {len(states)} registered adapter(s)" in out
