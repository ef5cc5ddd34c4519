"""A second `loranode api` replica beside a running cluster's, HAProxy in front of both (the shipped
deploy/haproxy/haproxy.cfg), and what each replica's /metrics says it served."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from node.chain.anvil import free_port
from node.client.payer import Payer
from node.devkit.balancer import Balancer
from node.errors import NodeRefusal, NodeUnreachable
from tests.e2e.cluster import Cluster
from tests.e2e.processes import node_command
from tests.e2e.traffic import ClientLog, Outcome, send_raw

log = logging.getLogger(__name__)


def adapter_requests(base_url: str) -> Counter[str]:
    """Paid requests this replica answered, by adapter (its `loranode_requests` counter)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "loranode_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["adapter"]] += int(sample.value)
    return counts


def affinity(per_replica: dict[str, Counter[str]]) -> float:
    """The share of requests that landed on their adapter's home: the replica that served it most."""
    adapters = {a for counts in per_replica.values() for a in counts}
    home = sum(max(counts[a] for counts in per_replica.values()) for a in adapters)
    total = sum(sum(counts.values()) for counts in per_replica.values())
    return home / total if total else 0.0


def wait_ready(cluster: Cluster, name: str, url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cluster.check_alive(name)
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"replica {name} was not ready in {timeout_s}s\n{cluster.logs()}")


@contextmanager
def second_replica_behind_balancer(cluster: Cluster, workdir: Path) -> Iterator[tuple[Balancer, dict[str, str]]]:
    """Replica "b" as an operator starts it on the same host: the same settings (LORANODE_PORT
    included) and `loranode api --port` of its own, with an adapter cache of its own. Yields the
    balancer and each replica's URL."""
    port = free_port()
    # the same settings as replica a but its adapter cache: a disk cache belongs to one process
    cluster.start("api-b", (*node_command("api"), "--port", str(port)), adapter_cache_dir=workdir / "adapter-cache-b")
    urls = {"a": cluster.base_url, "b": f"http://127.0.0.1:{port}"}
    wait_ready(cluster, "api-b", urls["b"])
    servers = {name: url.removeprefix("http://") for name, url in urls.items()}
    with Balancer(servers, workdir) as balancer:
        balancer.wait_states({"a": "UP", "b": "UP"})
        yield balancer, urls


def _signed(payer: Payer, body: bytes, lane: int, tries: int = 20) -> str:
    """A voucher for `body` (asking the node for its quote and the lane's total, again if that call broke:
    no answer, or the balancer's 5xx while a replica dies)."""
    for _ in range(tries - 1):
        try:
            return payer.payment_header(body, lane)
        except (httpx.TransportError, NodeUnreachable):
            time.sleep(0.5)
        except NodeRefusal as refused:
            if refused.http_status < 500:
                raise
            time.sleep(0.5)
    return payer.payment_header(body, lane)


class RetryingTraffic:
    """Paid completions back to back on each lane (every third streamed), from a client that does what
    a careful one does when a connection breaks: it sends the same bytes with the same voucher again
    until it gets an answer (the stored one if the first request was charged, read back from its receipt
    if that charge is already in an epoch; 409 while the voucher is held by a replica that died, until
    that hold expires). Every try is an Outcome in `log`."""

    BROKEN = (0, 502, 503, 504)
    AFTER_A_BREAK = (*BROKEN, 409, 429)  # what a retry after a break waits out

    def __init__(self, payers: list[Payer], lanes: list[tuple[int, int]], models: list[str], url: str,
                 log: ClientLog, retry_for_s: float = 60.0) -> None:
        self.payers, self.lanes, self.models, self.url, self.log = payers, lanes, models, url, log
        self.retry_for_s = retry_for_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._drive, args=lane, daemon=True) for lane in lanes]

    def _drive(self, payer_index: int, lane: int) -> None:
        payer, i = self.payers[payer_index], 0
        while not self._stop.is_set():
            body = json.dumps({"model": self.models[(i + lane) % len(self.models)], "prompt": "the sea is",
                               "max_tokens": 3 + i % 6, "stream": i % 3 == 2}).encode()
            header = _signed(payer, body, lane)
            outcome = self._until_answered(payer, lane, body, header)
            if outcome.is_served:
                payer.observe(lane, int(outcome.receipts[-1]["chargedTotal"]))
            else:
                payer.forget(lane)
            i += 1

    def _until_answered(self, payer: Payer, lane: int, body: bytes, header: str) -> Outcome:
        """Send it, and after a break send the same bytes again until they are answered: served fresh (the
        break came before any charge) or the stored answer replayed (it came after). Whatever a broken
        call may leave behind for a while is waited out: 409 (the voucher still held by the replica that
        died, until the hold expires), 429 and 5xx (the surviving replica taking every lane at once).
        Why a retry stopped is logged: only the deadline stops one that was never answered."""
        outcome = self.log.add(send_raw(self.url, body, header, payer.address, lane))
        if outcome.status not in self.BROKEN:
            return outcome
        deadline, tries = time.monotonic() + self.retry_for_s, 1
        while outcome.status in self.AFTER_A_BREAK and time.monotonic() < deadline:
            time.sleep(0.5)
            outcome, tries = self.log.add(send_raw(self.url, body, header, payer.address, lane)), tries + 1
            if outcome.status == 409 and outcome.receipt_id:
                outcome = self._read_settled(payer, lane, body, outcome)
        if outcome.is_served:
            log.info("lane %s/%d answered after %d tries (%s)", payer.address[:8], lane, tries,
                     "fresh" if not outcome.receipts else f"receipt {outcome.receipts[-1]['id']}")
        else:
            log.warning("lane %s/%d: retries stopped after %d tries: status %d %s%s", payer.address[:8], lane,
                        tries, outcome.status, outcome.error,
                        " (deadline)" if outcome.status in self.AFTER_A_BREAK else " (a final refusal)")
        return outcome

    def _read_settled(self, payer: Payer, lane: int, body: bytes, refused: Outcome) -> Outcome:
        """The answer to a voucher that was charged and is already in an epoch: the node no longer replays
        it to whoever sends the voucher (the settle transaction makes it public) and names its receipt
        instead, which the payer reads with a signed X-Receipt-Read, as its 409 says. While that read
        breaks too (a replica dying), the 409 stands and the retry goes on."""
        try:
            doc = payer.receipt(refused.receipt_id)
        except (httpx.TransportError, NodeUnreachable):
            return refused
        except NodeRefusal as error:
            if error.http_status < 500:
                raise
            return refused
        assert "output" in doc, f"the node no longer keeps the answer of receipt {refused.receipt_id}"
        log.info("lane %s/%d: answer read from settled receipt %s", payer.address[:8], lane, refused.receipt_id)
        request = json.loads(body)
        return self.log.add(Outcome(payer.address, lane, str(request["model"]), bool(request.get("stream")), 200,
                                    (doc,)))

    def __enter__(self) -> RetryingTraffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.retry_for_s + 60)
            assert not t.is_alive(), "a traffic lane did not finish"
