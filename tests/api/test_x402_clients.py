"""The stock x402 Python SDK against a live node, beyond a plain paid answer (docs/x402.md): a streamed
answer's PAYMENT-RESPONSE in its last chunk, a client that lost its channel state recovering through the
corrective 402, a client whose answer was lost getting it again without paying twice (to its payer only,
once the channel is claimed), a stream the client hangs up on; the node as facilitator: test_x402_facilitator.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
from eth_account import Account
from requests.adapters import HTTPAdapter
from x402 import x402ClientSync
from x402.http.clients.requests import x402HTTPAdapter

from node.chain.receipt_read import HEADER, channel_read_id, sign_read
from node.client.payer import Payer as LanePayer
from node.client.payer import verify_receipt
from tests.fixtures.paid_node import PaidNode
from tests.fixtures.x402_node import chat, decode, payer_key, payment_required, sdk_scheme, settle_and_reconcile
from tests.payment.x402.sdk import Payer

pytestmark = [pytest.mark.chain, pytest.mark.slow]
MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
BUSY = "invalid_batch_settlement_evm_channel_busy"


class _Wire(HTTPAdapter):
    """Below the SDK's adapter: every request it puts on the wire, with the answer's status."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, int, requests.Response]] = []

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        response = super().send(request, *args, **kwargs)
        self.seen.append(("PAYMENT-SIGNATURE" in request.headers, response.status_code, response))
        return response


class _Recorded(x402HTTPAdapter, _Wire):
    def __init__(self, client: x402ClientSync) -> None:
        x402HTTPAdapter.__init__(self, client)
        _Wire.__init__(self)


class _LossyWire(_Wire):
    """A wire that loses the next paid answer once `lose` is set: the node served and charged it, the client
    never read it (a dropped connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = False

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        response = super().send(request, *args, **kwargs)
        if self.lose and response.status_code == 200 and "PAYMENT-SIGNATURE" in request.headers:
            self.lose = False
            raise requests.ConnectionError("the answer was lost on the way back")
        return response


class _Lossy(x402HTTPAdapter, _LossyWire):
    def __init__(self, client: x402ClientSync) -> None:
        x402HTTPAdapter.__init__(self, client)
        _LossyWire.__init__(self)


def _recorded_session(node: PaidNode, offset: int, lossy: bool = False
                      ) -> tuple[requests.Session, _Recorded | _Lossy]:
    client = x402ClientSync().register(f"eip155:{node.local.deployment.chain_id}", sdk_scheme(node, offset))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
    adapter = _Lossy(client) if lossy else _Recorded(client)
    session = requests.Session()
    session.mount("http://", adapter)
    return session, adapter


def _domain(node: PaidNode) -> Any:
    return LanePayer(node.payer_keys[0], node.base_url).info


def _stream(node: PaidNode, body: dict[str, Any], header: str) -> dict[str, Any]:
    """The streamed answer's last chunk (usage, receipt, payment_response)."""
    with requests.post(f"{node.base_url}/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": header},
                       timeout=120, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        assert "PAYMENT-RESPONSE" not in resp.headers, "a stream's headers leave before its charge"
        events = [line for line in resp.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    return dict(json.loads(events[-2][6:]))


def test_a_streamed_answer_carries_its_payment_response_in_its_last_chunk(x402_node: PaidNode) -> None:
    """The SDK takes the last chunk's PAYMENT-RESPONSE as it takes the header: its next voucher is on the
    node's running total at once (no corrective 402), and every answer has a receipt the node signed."""
    info = _domain(x402_node)
    payer = Payer(payer_key(x402_node.local, 4), x402_node.local.anvil.rpc_url, x402_node.local.deployment.chain_id)
    body = chat(x402_node, "the sea", stream=True, max_tokens=6)
    required = payment_required(x402_node, body)
    header, payment = payer.pay(required)
    assert payment.kind == "deposit"
    last = _stream(x402_node, body, header)
    receipt, settled = last["receipt"], decode(last["payment_response"])
    assert verify_receipt(receipt, info.domain) == info.node
    assert settled["success"] and settled["extra"]["chargedAmount"] == receipt["fee"]
    assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == receipt["chargedTotal"] == receipt["fee"]
    assert int(receipt["fee"]) <= payment.accepted_amount, "never charged above the price"
    assert settled["transaction"].startswith("0x") and settled["amount"] == str(payment.deposit.amount)  # type: ignore[union-attr]
    amount = int(next(a for a in required["accepts"] if a["scheme"] == "batch-settlement")["amount"])
    payer.answered(payment, settled, amount)

    plain = chat(x402_node, "calm and blue")
    header, payment = payer.pay(payment_required(x402_node, plain))
    assert payment.kind == "voucher" and payment.voucher.max_claimable == int(receipt["chargedTotal"]) + \
        payment.accepted_amount
    resp = requests.post(f"{x402_node.base_url}/v1/chat/completions", json=plain,
                         headers={"PAYMENT-SIGNATURE": header}, timeout=120)
    assert resp.status_code == 200, resp.text  # paid at the first try
    second = resp.json()["receipt"]
    assert verify_receipt(second, info.domain) == info.node
    assert int(second["chargedTotal"]) == int(receipt["fee"]) + int(second["fee"])
    settled = decode(resp.headers["PAYMENT-RESPONSE"])
    assert settled["transaction"] == "" and settled["amount"] == "", "a voucher moves no token"


def test_a_stock_client_that_lost_its_channel_state_pays_again_through_the_corrective_402(x402_node: PaidNode
                                                                                          ) -> None:
    """The SDK's own `requests` adapter, start to end: one client pays twice (a deposit, then a voucher);
    a new client of the same payer (its channel state lost) reads the channel from the chain, signs on a
    stale total, gets the corrective 402, checks the node's copy of its last voucher and pays at the next
    try; it is charged once, on the node's running total."""
    info = _domain(x402_node)
    url = f"{x402_node.base_url}/v1/chat/completions"
    first, _ = _recorded_session(x402_node, 5)
    total = 0
    for prompt in ("the sea", "blue"):
        resp = first.post(url, json=chat(x402_node, prompt), timeout=120)
        assert resp.status_code == 200, resp.text
        total += int(resp.json()["receipt"]["fee"])

    fresh, wire = _recorded_session(x402_node, 5)  # the same payer key, no local state
    resp = fresh.post(url, json=chat(x402_node, "calm"), timeout=120)
    assert resp.status_code == 200, resp.text
    assert [(paid, status) for paid, status, _ in wire.seen] == [(False, 402), (True, 402), (True, 200)]
    corrective = decode(wire.seen[1][2].headers["PAYMENT-REQUIRED"])
    offer = next(a for a in corrective["accepts"] if a["scheme"] == "batch-settlement")
    assert corrective["error"] == MISMATCH and offer["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
    receipt = resp.json()["receipt"]
    assert verify_receipt(receipt, info.domain) == info.node
    assert int(receipt["chargedTotal"]) == total + int(receipt["fee"]), "charged once, on the running total"
    assert decode(resp.headers["PAYMENT-RESPONSE"])["extra"]["chargedAmount"] == receipt["fee"]

    wire.seen.clear()  # resynchronised: the next request is paid at the first try
    resp = fresh.post(url, json=chat(x402_node, "the sea is"), timeout=120)
    assert resp.status_code == 200 and [s for _, s, _ in wire.seen] == [402, 200]


def _lose_the_next_answer(session: requests.Session, wire: _Lossy, url: str, body: dict[str, Any]
                          ) -> requests.Response:
    """Pay `body` through the stock client on a wire that drops the answer: the node's answer, which the client
    never read (its PAYMENT-RESPONSE neither: the client's channel state stays where it was)."""
    wire.lose, before = True, len(wire.seen)
    with pytest.raises(Exception, match="lost on the way back"):
        session.post(url, json=body, timeout=120)
    lost = wire.seen[-1][2]
    assert lost.status_code == 200 and len(wire.seen) == before + 2, "paid at the first try, then lost"
    return lost


def test_a_stock_client_whose_answer_was_lost_gets_it_again_and_pays_once(x402_node: PaidNode) -> None:
    """The stock client sends the same payment again for a request whose answer was lost (its channel state
    never moved: the answer's PAYMENT-RESPONSE never came). The node replays the stored answer, free, with a
    PAYMENT-RESPONSE naming the channel's charged total, so the client's next request is paid at the first
    try. It used to get the corrective 402 ("already used") and pay a second generation of the same request.
    The same voucher with another body is refused as before (the corrective 402): that request is paid once,
    on the running total."""
    url = f"{x402_node.base_url}/v1/chat/completions"
    session, wire = _recorded_session(x402_node, 7, lossy=True)
    assert session.post(url, json=chat(x402_node, "the sea"), timeout=120).status_code == 200  # the deposit
    assert isinstance(wire, _Lossy)
    body = chat(x402_node, "calm", temperature=0.5)
    lost = _lose_the_next_answer(session, wire, url, body)
    charged = int(lost.json()["receipt"]["chargedTotal"])

    wire.seen.clear()
    again = session.post(url, json=body, timeout=120)
    assert again.status_code == 200, again.text
    assert [(paid, status) for paid, status, _ in wire.seen] == [(False, 402), (True, 200)], "paid nothing again"
    assert again.headers["X-Idempotent-Replay"] == "true" and again.json() == lost.json()
    state = decode(again.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]
    assert state["chargedCumulativeAmount"] == str(charged)

    wire.seen.clear()  # the client took the channel's total from the replay: paid at the first try
    resp = session.post(url, json=chat(x402_node, "the sea is"), timeout=120)
    assert [status for _, status, _ in wire.seen] == [402, 200], resp.text
    assert int(resp.json()["receipt"]["chargedTotal"]) == charged + int(resp.json()["receipt"]["fee"])
    charged = int(resp.json()["receipt"]["chargedTotal"])

    lost = _lose_the_next_answer(session, wire, url, chat(x402_node, "blue", temperature=0.5))
    charged = int(lost.json()["receipt"]["chargedTotal"])
    wire.seen.clear()  # the same price, so the same voucher, for another body: no second generation on it
    other = session.post(url, json=chat(x402_node, "blue", temperature=0.7), timeout=120)
    assert [(paid, status) for paid, status, _ in wire.seen] == [(False, 402), (True, 402), (True, 200)]
    assert decode(wire.seen[1][2].headers["PAYMENT-REQUIRED"])["error"] == MISMATCH
    assert "X-Idempotent-Replay" not in other.headers
    assert int(other.json()["receipt"]["chargedTotal"]) == charged + int(other.json()["receipt"]["fee"])


def test_a_lost_first_answer_paid_by_a_deposit_is_replayed_without_a_second_deposit(x402_node: PaidNode) -> None:
    """The first request of a channel pays with a deposit; its answer lost, the client knows of no deposit
    and sends a deposit again with the same voucher: the node replays the answer before submitting anything
    (the payer's tokens stay where they are), and the next request is paid by a voucher at the first try."""
    url = f"{x402_node.base_url}/v1/chat/completions"
    session, wire = _recorded_session(x402_node, 1, lossy=True)
    assert isinstance(wire, _Lossy)
    body = chat(x402_node, "the sea")
    lost = _lose_the_next_answer(session, wire, url, body)
    deposited = decode(lost.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["balance"]
    wire.seen.clear()
    again = session.post(url, json=body, timeout=120)
    assert [(paid, status) for paid, status, _ in wire.seen] == [(False, 402), (True, 200)], again.text
    assert decode(wire.seen[1][2].request.headers["PAYMENT-SIGNATURE"])["payload"]["type"] == "deposit"
    assert again.headers["X-Idempotent-Replay"] == "true" and again.json() == lost.json()
    state = decode(again.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]
    assert state["balance"] == deposited, "no second deposit"
    wire.seen.clear()
    resp = session.post(url, json=chat(x402_node, "blue"), timeout=120)
    assert [status for _, status, _ in wire.seen] == [402, 200], resp.text
    assert decode(wire.seen[1][2].request.headers["PAYMENT-SIGNATURE"])["payload"]["type"] == "voucher"
    assert int(resp.json()["receipt"]["chargedTotal"]) == int(lost.json()["receipt"]["fee"]) + \
        int(resp.json()["receipt"]["fee"])


def test_an_x402_stream_the_client_hangs_up_on_is_charged_for_what_was_generated(x402_node: PaidNode) -> None:
    """The lanes' rule for a dropped stream, on a channel: charged for what was generated before the
    hang-up, never above the request's price; the client learns the new total from the corrective 402
    (it never saw the last chunk) and pays on it."""
    local = x402_node.local
    payer = Payer(payer_key(local, 8), local.anvil.rpc_url, local.deployment.chain_id)
    body = chat(x402_node, "the sea", stream=True, max_tokens=400, stop=["@@never@@"])
    header, payment = payer.pay(payment_required(x402_node, body))
    with requests.post(f"{x402_node.base_url}/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": header},
                       timeout=60, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        next(line for line in resp.iter_lines() if b'"content":"' in line and b'"content":""' not in line)
    plain = chat(x402_node, "blue")
    deadline, corrective = time.monotonic() + 10, None
    while corrective is None or corrective["error"] == BUSY:  # the hold is released once the node notices
        assert time.monotonic() < deadline, corrective
        time.sleep(0.2)
        stale, _ = payer.pay(payment_required(x402_node, plain))
        resp = requests.post(f"{x402_node.base_url}/v1/chat/completions", json=plain,
                             headers={"PAYMENT-SIGNATURE": stale}, timeout=60)
        assert resp.status_code == 402, resp.text
        corrective = decode(resp.headers["PAYMENT-REQUIRED"])
    assert corrective["error"] == MISMATCH
    offer = next(a for a in corrective["accepts"] if a["scheme"] == "batch-settlement")
    dropped = int(offer["extra"]["channelState"]["chargedCumulativeAmount"])
    assert 0 < dropped <= payment.accepted_amount, "charged for the tokens sent, never above the price"
    assert payer.recover(corrective)
    header, _ = payer.pay(payment_required(x402_node, plain))
    resp = requests.post(f"{x402_node.base_url}/v1/chat/completions", json=plain,
                         headers={"PAYMENT-SIGNATURE": header}, timeout=60)
    assert resp.status_code == 200, resp.text
    receipt = resp.json()["receipt"]
    assert int(receipt["chargedTotal"]) == dropped + int(receipt["fee"])


def test_an_x402_payer_reads_the_text_of_its_own_receipts_and_no_one_else_does(x402_node: PaidNode) -> None:
    """An x402 receipt's voucher names the router as payer; the channel's payer signs the read
    (`X-Receipt-Read`), as a lane payer does, and anyone else is refused."""
    info = _domain(x402_node)
    key = payer_key(x402_node.local, 9)
    session = requests.Session()
    client = x402ClientSync().register(f"eip155:{x402_node.local.deployment.chain_id}", sdk_scheme(x402_node, 9))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
    session.mount("http://", x402HTTPAdapter(client))
    resp = session.post(f"{x402_node.base_url}/v1/chat/completions", json=chat(x402_node, "the sea"), timeout=120)
    assert resp.status_code == 200, resp.text
    receipt_id, text = resp.json()["receipt"]["id"], resp.json()["choices"][0]["message"]["content"]
    url = f"{x402_node.base_url}/v1/receipts/{receipt_id}"
    payer = Account.from_key(key).address
    mine = requests.get(url, headers={HEADER: sign_read(key, payer, receipt_id, info.domain)}, timeout=30)
    assert mine.status_code == 200, mine.text
    assert mine.json()["output"] == text and mine.json()["payer"].lower() == payer.lower()
    other = payer_key(x402_node.local, 8)
    theirs = requests.get(url, headers={HEADER: sign_read(other, Account.from_key(other).address, receipt_id,
                                                          info.domain)}, timeout=30)
    assert theirs.status_code == 403, theirs.text
    assert "output" not in requests.get(url, timeout=30).json()


def test_an_x402_payer_lists_its_channels_receipts_and_no_one_else_does(x402_node: PaidNode) -> None:
    """What an agent expects after paying: its receipts, newest first, each with the channel's charged total
    after it, by the channel id its PAYMENT-RESPONSE named (before: lanes only; the channel is a lane of the
    router, whose receipts nobody could list). Only the channel's payer reads them."""
    info = _domain(x402_node)
    key = payer_key(x402_node.local, 6)
    session = requests.Session()
    client = x402ClientSync().register(f"eip155:{x402_node.local.deployment.chain_id}", sdk_scheme(x402_node, 6))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": str(10**18)})
    session.mount("http://", x402HTTPAdapter(client))
    paid = []
    for words in ("the sea", "the hill"):
        resp = session.post(f"{x402_node.base_url}/v1/chat/completions", json=chat(x402_node, words), timeout=120)
        assert resp.status_code == 200, resp.text
        paid.append((resp.json()["receipt"], decode(resp.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]))
    channel = paid[0][1]["channelId"]
    url = f"{x402_node.base_url}/v1/x402/channels/{channel}/receipts"
    payer = Account.from_key(key).address
    mine = requests.get(url, headers={HEADER: sign_read(key, payer, channel_read_id(info.node, channel), info.domain)},
                        timeout=30)
    assert mine.status_code == 200, mine.text
    listed = mine.json()["receipts"]
    assert [r["id"] for r in listed] == [paid[1][0]["id"], paid[0][0]["id"]], "newest first"
    assert [r["chargedTotal"] for r in listed] == [paid[1][1]["chargedCumulativeAmount"],
                                                   paid[0][1]["chargedCumulativeAmount"]]
    assert mine.json()["next"] is None and "output" not in listed[0]
    page = requests.get(url + "?limit=1", headers={HEADER: sign_read(key, payer, channel_read_id(info.node, channel),
                                                                     info.domain)}, timeout=30).json()
    assert [r["id"] for r in page["receipts"]] == [paid[1][0]["id"]] and page["next"] is not None
    other = payer_key(x402_node.local, 8)
    theirs = requests.get(url, headers={HEADER: sign_read(other, Account.from_key(other).address,
                                                          channel_read_id(info.node, channel), info.domain)},
                          timeout=30)
    assert theirs.status_code == 403, theirs.text
    assert requests.get(url, timeout=30).status_code == 401
    unknown = "0x" + "ab" * 32
    read = sign_read(key, payer, channel_read_id(info.node, unknown), info.domain)
    assert requests.get(f"{x402_node.base_url}/v1/x402/channels/{unknown}/receipts", headers={HEADER: read},
                        timeout=30).status_code == 404


def test_a_lost_answer_whose_voucher_the_channels_claim_published_replays_only_to_its_payer(
        x402_node: PaidNode) -> None:
    """The epoch's sweep claims the channel with its payer's highest voucher, in a transaction anyone reads
    (and the corrective 402 then shows any holder of one the latest): from then on the payment sent again
    gets a 409 naming its receipt (the stock client passes it on, paying nothing), and the stored answer
    only with the channel payer's X-Receipt-Read of that receipt; a stranger's read gets 403, no text."""
    info = _domain(x402_node)
    url = f"{x402_node.base_url}/v1/chat/completions"
    session, wire = _recorded_session(x402_node, 3, lossy=True)
    assert session.post(url, json=chat(x402_node, "the sea"), timeout=120).status_code == 200
    assert isinstance(wire, _Lossy)
    body = chat(x402_node, "calm and blue")
    lost = _lose_the_next_answer(session, wire, url, body)
    header, receipt_id = wire.seen[-1][2].request.headers["PAYMENT-SIGNATURE"], lost.json()["receipt"]["id"]
    settle_and_reconcile(x402_node.local)

    wire.seen.clear()
    resp = session.post(url, json=body, timeout=120)
    assert [(paid, status) for paid, status, _ in wire.seen] == [(False, 402), (True, 409)], resp.text
    assert receipt_id in resp.text and "X-Receipt-Read" in resp.text and "choices" not in resp.json()
    stranger = payer_key(x402_node.local, 2)
    for read, status in ((None, 409), (sign_read(stranger, Account.from_key(stranger).address, receipt_id,
                                                 info.domain), 403)):
        headers = {"PAYMENT-SIGNATURE": header, **({HEADER: read} if read else {})}
        resp = requests.post(url, json=body, headers=headers, timeout=120)
        assert resp.status_code == status and "choices" not in resp.json(), resp.text
    key = payer_key(x402_node.local, 3)
    own = requests.post(url, json=body, timeout=120, headers={
        "PAYMENT-SIGNATURE": header, HEADER: sign_read(key, Account.from_key(key).address, receipt_id, info.domain)})
    assert own.status_code == 200 and own.headers["X-Idempotent-Replay"] == "true", own.text
    assert own.json() == lost.json()
