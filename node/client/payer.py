"""The dApp side: sign a voucher for each request's exact bytes, keep lanes, plug into OpenAI clients.

    payer = Payer(key, "http://node:8000")
    client = payer.openai(lane=0)            # the official `openai` client, paying on lane 0
    client.chat.completions.create(model="1", messages=[...])

A lane is sequential: use one client per lane, and more lanes for parallel work. The hook signs
`cumulative = chargedTotal + maxFee`, where the node's quote of the exact body it sends (POST
/v1/quote/...: its prompt tokens and max_tokens priced as the node holds them) gives both, so a
funded payer is never refused and never signs for more than the request can cost. With
`budget=N` it signs `chargedTotal + N` instead, without a quote (what it does not spend carries
over; a request that may cost more than N is refused with 402). Its HTTP clients keep a lane's
last voucher until its request is answered, so a retry of the same bytes (the OpenAI client retries
on connection errors, 408, 409, 429 and 5xx) sends the same voucher: a request that was served but
whose answer was lost is replayed, not charged twice; once that voucher is in an epoch (public, so
the node answers 409 naming its receipt), they send it again with this payer's `X-Receipt-Read` of
that receipt and get the stored answer all the same.
`payer.receipt(id)` reads one of its own receipts with its text, which the node shows to nobody else;
`payer.receipts(lane)` lists a lane's receipts, newest first, each with the charged total after it.

The voucher's cumulative is what the escrow lets the node collect on the lane, and the lane's charged
total and last voucher come from the node: a `Payer` remembers the most it signed on each lane and
refuses (PaymentError, nothing signed) a node that reports either above it. A new `Payer` on a lane
used before has no such memory: it asks the node for the lane's last voucher, checks that this payer
signed it (for this node and lane), and signs on top of the node's figures only up to it; a node that
cannot show it is refused the same way (`trust_reported_total=True` takes the node's word instead).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account import Account

from node.chain.receipt_read import HEADER, lane_read_id, sign_read
from node.client.refusal import check, reaching
from node.client.settled_replay import SettledReplay
from node.errors import NodeError, NodeRefusal, PaymentError
from node.payment.pricing import Pricing
from node.protocol.eip712 import Domain, recover
from node.protocol.receipt import SignedReceipt, recover_receipt_signer
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher, voucher_digest

PAID_PATHS = ("/v1/completions", "/v1/chat/completions")
CLOCK_MARGIN_S = 60  # on top of the node's minimum validity: clock skew and the request's way there
RETRIED_STATUSES = frozenset({408, 409, 429})  # and 5xx: what OpenAI clients send again, bytes unchanged
RETRY_WINDOW_S = 600  # how long an unanswered voucher is sent again for the same bytes


@dataclass(frozen=True)
class LaneVoucher:
    """A lane's last voucher, for the request whose body hashes to `request_hash`."""

    request_hash: bytes
    deadline: int
    header: str
    signed_at: float


@dataclass(frozen=True)
class NodeInfo:
    node: str
    chain_id: int
    domain: Domain
    max_model_len: int
    min_validity_s: int = 0  # the node refuses a new voucher with less time left
    pricing: Pricing | None = None  # the prices it publishes (a quote must agree with them)
    base_pricing: Pricing | None = None  # those of the base model called by name (`base_model_name`)
    base_model_name: str | None = None


class Payer:
    def __init__(self, key: str, base_url: str, *, budget: int | None = None, validity_s: int = 3_600,
                 timeout_s: float = 60.0, trust_reported_total: bool = False) -> None:
        self.key = key
        self.trust_reported_total = trust_reported_total
        self.address = str(Account.from_key(key).address)
        self.base_url = base_url.rstrip("/")
        self.budget = budget
        self.validity_s = validity_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._info: NodeInfo | None = None
        self._charged: dict[int, int] = {}  # lane -> charged total as last seen
        self._unanswered: dict[int, LaneVoucher] = {}  # lane -> its last voucher, until answered
        self._signed: dict[int, int] = {}  # lane -> the highest cumulative this payer signed there
        self._lock = threading.Lock()

    # --- the node ---------------------------------------------------------------------------------
    @property
    def info(self) -> NodeInfo:
        if self._info is None:
            data = self._get("/v1/node")
            d = data["domain"]
            self._info = NodeInfo(node=data["node"], chain_id=data["chainId"], max_model_len=data["maxModelLen"],
                                  pricing=_pricing(data.get("prices")), base_pricing=_pricing(data.get("basePrices")),
                                  base_model_name=data.get("baseModelName"),
                                  min_validity_s=int(data.get("minVoucherValiditySeconds", 0)),
                                  domain=Domain(chain_id=d["chainId"], verifying_contract=d["verifyingContract"],
                                                name=d["name"], version=d["version"]))
        return self._info

    def channel(self, lane: int) -> dict[str, Any]:
        # lastVoucher: shown to us only, at this node only
        read = sign_read(self.key, self.address, lane_read_id(self.info.node, lane), self.info.domain)
        data = self._get(f"/v1/channels/{self.address}/{lane}", headers={HEADER: read})
        self._learn(lane, data.get("lastVoucher"))
        self._check_lane(lane, int(data["chargedTotal"]), int(data.get("lastCumulative", 0)))
        with self._lock:
            self._charged[lane] = int(data["chargedTotal"])
        return data

    def receipts(self, lane: int, *, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        """This payer's receipts on `lane`, newest first (GET /v1/channels/{payer}/{lane}/receipts): each
        with the lane's charged total after it; `next` is the `before` of the next page (None: the last)."""
        read = sign_read(self.key, self.address, lane_read_id(self.info.node, lane), self.info.domain)
        query = f"?limit={limit}" + (f"&before={before}" if before is not None else "")
        return self._get(f"/v1/channels/{self.address}/{lane}/receipts{query}", headers={HEADER: read})

    def receipt(self, receipt_id: str) -> dict[str, Any]:
        """One of this payer's receipts with its text (the output while the node keeps it, and the
        evidence spans), fetched with a freshly signed, short-lived `X-Receipt-Read`."""
        header = sign_read(self.key, self.address, receipt_id, self.info.domain)
        return self._get(f"/v1/receipts/{receipt_id}", headers={HEADER: header})

    def public_receipt(self, receipt_id: str) -> dict[str, Any]:
        """One receipt as anyone may read it from this node: its signed fields, no text."""
        return self._get(f"/v1/receipts/{receipt_id}")

    def quote(self, path: str, body: bytes, lane: int) -> tuple[int, int]:
        """(the lane's charged total, what to sign on top of it for the request `body` sent to `path`): the
        most it can cost, as the node computes its hold, or more only up to 1 above the cumulative this
        payer already signed on the lane (the node refuses a voucher below one it accepted, and signing
        that again authorizes nothing new). A node that refuses to quote the body (it will refuse the request
        the same way, before any payment) or predates the quote gets the lane's quote for any request."""
        kind = path[path.rindex("/v1/") + len("/v1/"):]
        try:
            data = self._request("POST", f"/v1/quote/{kind}", params={"payer": self.address, "lane": lane},
                                 content=body, headers={"Content-Type": "application/json"})
        except NodeRefusal:
            data = self.channel(lane)
            charged, max_fee = int(data["chargedTotal"]), int(data["quote"]["maxFee"])
        else:
            self._check_quote(data, body)
            charged, max_fee = int(data["chargedTotal"]), int(data["maxFee"])
        last = int(data.get("lastCumulative", 0))
        with self._lock:
            is_known = lane in self._signed
        if not is_known and max(charged, last) > 0 and "lastVoucher" not in data:
            self.channel(lane)  # a lane used before this Payer: learn what it signed there
        self._check_lane(lane, charged, last)
        with self._lock:
            self._charged[lane] = charged
        # above the last accepted voucher: equal to it, the same body would sign the very same voucher,
        # which the node answers as a replay of the first request
        return charged, max_fee if charged + max_fee > last else last + 1 - charged

    def _check_quote(self, quote: dict[str, Any], body: bytes) -> None:
        """Sign nothing a request cannot cost: the quote's maxFee is its token counts, for its `n` choices,
        at the node's published prices for the model asked, within the context, for no more than the
        max_tokens asked (if asked)."""
        info, max_fee = self.info, int(quote["maxFee"])
        prompt_tokens, max_tokens = int(quote["promptTokens"]), int(quote["maxTokens"])
        try:
            request = json.loads(body)
            asked = request.get("max_completion_tokens") or request.get("max_tokens")
            n, model = int(request.get("n") or 1), request.get("model")
        except (ValueError, AttributeError, TypeError):
            asked, n, model = None, 1, None
        pricing = info.base_pricing if model is not None and model == info.base_model_name else info.pricing
        fair = pricing is None or max_fee == pricing.max_fee(prompt_tokens, max_tokens, n)
        if not fair or prompt_tokens + max_tokens > info.max_model_len or (asked and max_tokens > int(asked)):
            raise PaymentError("the node quoted more than this request can cost at its published prices: "
                               "nothing was signed", quote=quote, max_model_len=info.max_model_len)

    def _learn(self, lane: int, last_voucher: Any) -> None:
        """Remember the cumulative of the lane's last voucher as the node shows it, once it is checked to
        be this payer's own signature for this node and lane (anything else proves nothing)."""
        if not isinstance(last_voucher, dict):
            return
        info = self.info
        try:
            shown = SignedVoucher.from_json(last_voucher)
            signer = recover(voucher_digest(shown.voucher, info.domain), shown.signature)
        except (KeyError, TypeError, ValueError, NodeError):
            return
        if signer.lower() == self.address.lower() == shown.payer.lower() and shown.lane == lane \
                and shown.node.lower() == info.node.lower():
            with self._lock:
                self._signed[lane] = max(self._signed.get(lane, 0), shown.cumulative)

    def _check_lane(self, lane: int, charged: int, last: int) -> None:
        """Refuse a lane whose charged total or last voucher, as the node reports them, is above the most
        this payer signed there (as it remembers, or as the node showed it): no node can have charged, or
        been given, more than that, and signing on top of it would authorize the difference."""
        with self._lock:
            signed = self._signed.get(lane)
        if signed is None and not self.trust_reported_total:
            signed = 0  # nothing signed that this payer knows of
        if signed is not None and max(charged, last) > signed:
            raise PaymentError("the node reports a charge or a voucher on this lane above any this payer signed "
                               "(as it remembers, or as the node can show with the lane's last voucher): nothing "
                               "was signed (use one Payer per lane)", lane=lane, charged_total=str(charged),
                               last_cumulative=str(last), signed=str(signed))

    def _get(self, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self._request("GET", path, headers=headers)

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The node's JSON answer; NodeRefusal (its code and message) or NodeUnreachable otherwise."""
        with reaching(self.base_url):
            resp = self._http.request(method, path, **kwargs)
        return check(resp, self.base_url).json()  # type: ignore[no-any-return]

    # --- signing ----------------------------------------------------------------------------------
    def payment_header(self, body: bytes, lane: int, path: str | None = None) -> str:
        """The X-Payment value for `body` on `lane`: a new voucher on top of the lane's charged total,
        covering exactly what `body` sent to `path` (/v1/completions or /v1/chat/completions) can cost;
        without `path`, any request that fits the context."""
        return self._sign(request_hash(body), lane, body, path).header

    def retry_safe_header(self, body: bytes, lane: int, path: str | None = None) -> str:
        """`payment_header`, except that the lane's unanswered voucher is sent again if it is for these
        bytes (a retry) and still valid long enough: what the HTTP clients below send."""
        digest = request_hash(body)
        with self._lock:
            last = self._unanswered.get(lane)
        now = time.time()
        if last is not None and last.request_hash == digest and now - last.signed_at < RETRY_WINDOW_S and \
                last.deadline >= now + self.info.min_validity_s + CLOCK_MARGIN_S:
            return last.header
        signed = self._sign(digest, lane, body, path)
        with self._lock:
            self._unanswered[lane] = signed
        return signed.header

    def answered(self, lane: int, status: int) -> None:
        """The lane's request got an answer its client does not retry: the next request signs anew."""
        if status in RETRIED_STATUSES or status >= 500:
            return
        with self._lock:
            self._unanswered.pop(lane, None)

    def _ceiling(self, lane: int, body: bytes, path: str | None) -> tuple[int, int]:
        """(charged total, what to sign on top of it): the budget the caller set, else the request's
        quote (`path` given), else the lane's quote for any request."""
        with self._lock:
            charged = self._charged.get(lane)
        if self.budget is not None:
            return (charged if charged is not None else int(self.channel(lane)["chargedTotal"])), self.budget
        if path is not None:
            return self.quote(path, body, lane)
        quote = self.channel(lane)
        return int(quote["chargedTotal"]), int(quote["quote"]["maxFee"])

    def _sign(self, digest: bytes, lane: int, body: bytes = b"", path: str | None = None) -> LaneVoucher:
        charged, budget = self._ceiling(lane, body, path)
        info = self.info
        deadline = int(time.time()) + max(self.validity_s, info.min_validity_s + CLOCK_MARGIN_S)
        deadline += -deadline % 60  # up to the minute: a retry within it signs the same voucher
        voucher = Voucher(payer=self.address, node=info.node, lane=lane, cumulative=charged + budget,
                          request_hash=digest, deadline=deadline)
        with self._lock:
            self._signed[lane] = max(self._signed.get(lane, 0), voucher.cumulative)
        signature = sign_voucher(self.key, voucher, info.domain)
        header = SignedVoucher.of(voucher, signature).encode()
        return LaneVoucher(digest, deadline, header, time.time())

    def observe(self, lane: int, charged_total: int) -> None:
        """Record the lane's new charged total (from X-Charged-Total or a receipt); one above what this payer
        signed there is no charge a node can have made: the lane is asked again before the next voucher."""
        with self._lock:
            if charged_total > self._signed.get(lane, charged_total):
                self._charged.pop(lane, None)
                return
            self._charged[lane] = max(self._charged.get(lane, 0), charged_total)

    def forget(self, lane: int) -> None:
        with self._lock:
            self._charged.pop(lane, None)

    # --- HTTP clients -----------------------------------------------------------------------------
    def http_client(self, lane: int, **kwargs: Any) -> httpx.Client:
        """An httpx client that pays for every POST to the paid endpoints on `lane`."""

        def sign(request: httpx.Request) -> None:
            if request.method == "POST" and request.url.path.endswith(PAID_PATHS):
                request.headers["X-Payment"] = self.retry_safe_header(request.read(), lane, request.url.path)

        def learn(response: httpx.Response) -> None:
            if response.request.url.path.endswith(PAID_PATHS):
                self.answered(lane, response.status_code)
                total = response.headers.get("X-Charged-Total")
                if total is not None:
                    self.observe(lane, int(total))
                else:
                    self.forget(lane)  # streamed or refused: ask the node next time

        hooks: dict[str, list[Callable[[Any], None]]] = {"request": [sign], "response": [learn]}
        transport = SettledReplay(self, kwargs.pop("transport", None) or httpx.HTTPTransport())
        return httpx.Client(event_hooks=hooks, timeout=kwargs.pop("timeout", 120.0), transport=transport, **kwargs)

    def openai(self, lane: int = 0, **kwargs: Any) -> Any:
        """The official OpenAI client, pointed at the node and paying on `lane`."""
        from openai import OpenAI

        # openai 3 takes an httpx client as well as an httpx2 one (is_legacy_httpx_sync_client); its
        # annotation names only httpx2
        return OpenAI(base_url=self.base_url + "/v1", api_key="unused",
                      http_client=self.http_client(lane), **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self._http.close()


def verify_receipt(receipt: dict[str, Any], domain: Domain) -> str:
    """Recover the signer of a receipt as returned by the API (compare it with the node's address)."""
    signed = SignedReceipt.from_json(receipt)
    return recover_receipt_signer(signed.receipt, domain, signed.signature)


def _pricing(prices: dict[str, Any] | None) -> Pricing | None:
    """The Pricing a node publishes (`/v1/node`'s `prices` or `basePrices`), or None if it does not."""
    if prices is None:
        return None
    return Pricing(int(prices["promptTokenPrice"]), int(prices["completionTokenPrice"]), int(prices["minFee"]))
