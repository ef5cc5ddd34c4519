"""A small JSON-RPC client for the indexer: batched calls, and failures sorted into the named
transient errors the indexer retries (timeout, dropped connection, range too large) and the rest.

It deliberately has no retry of its own (web3.py's blanket retry cannot shrink a log range).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from node.errors import RangeTooLarge, RpcBehind, RpcError, RpcTimeout, RpcUnreachable

# Provider wordings for "this eth_getLogs range is too big" (Alchemy, Infura, QuickNode, Ankr, geth...).
_RANGE_TOO_LARGE = re.compile(
    r"block range|range is too (wide|large)|too many (results|blocks|logs)|more than \d+ results|"
    r"exceeds? (the )?max|limit(ed)? (to|exceeded)|response size|query timeout|returned more than", re.I)
_HINT_PAIR = re.compile(r"\[\s*(0x[0-9a-f]+)\s*,\s*(0x[0-9a-f]+)\s*\]", re.I)
_HINT_SIZE = re.compile(r"(?:limited to|max(?:imum)?(?: block)? range(?: is| of)?|up to) (?:a )?(\d+)", re.I)


@dataclass(frozen=True)
class BlockHeader:
    number: int
    hash: str
    parent_hash: str
    timestamp: int


def range_hint(message: str) -> int | None:
    """The number of blocks a provider's error message says would work, if it says one."""
    pair = _HINT_PAIR.search(message)
    if pair:
        return int(pair.group(2), 16) - int(pair.group(1), 16) + 1
    size = _HINT_SIZE.search(message)
    return int(size.group(1)) if size else None


class Rpc:
    """JSON-RPC over HTTP. `call` and `batch` raise RpcTimeout / RpcUnreachable / RangeTooLarge
    (transient) or RpcError."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self._client = httpx.Client(timeout=timeout_s)
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, *params: Any) -> Any:
        return self.batch([(method, list(params))])[0]

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Send `calls` in one HTTP request; results in the same order."""
        if not calls:
            return []
        body = [{"jsonrpc": "2.0", "id": next(self._ids), "method": m, "params": p} for m, p in calls]
        answers = self._post(body if len(body) > 1 else body[0])
        if isinstance(answers, dict):
            answers = [answers]
        by_id = {a.get("id"): a for a in answers}
        out = []
        for req in body:
            ans = by_id.get(req["id"])
            if ans is None:
                raise RpcError("the RPC answer lacks a request", method=req["method"])
            if "error" in ans:
                raise _rpc_error(str(req["method"]), ans["error"])
            out.append(ans.get("result"))
        return out

    def _post(self, body: object) -> Any:
        try:
            resp = self._client.post(self.url, json=body)
        except httpx.TimeoutException as e:
            raise RpcTimeout("RPC timed out", url=self.url, error=type(e).__name__) from e
        except httpx.TransportError as e:
            raise RpcUnreachable("RPC connection failed", url=self.url, error=type(e).__name__) from e
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RpcUnreachable("RPC answered HTTP error", url=self.url, status=resp.status_code)
        try:
            return resp.json()
        except ValueError as e:
            raise RpcUnreachable("RPC answered something that is not JSON", url=self.url,
                                 status=resp.status_code) from e

    # --- the reads the indexer needs --------------------------------------------------------------

    def block_number(self) -> int:
        return int(self.call("eth_blockNumber"), 16)

    def chain_id(self) -> int:
        return int(self.call("eth_chainId"), 16)

    def headers(self, numbers: Sequence[int]) -> list[BlockHeader | None]:
        """Headers of the blocks `numbers` (None where the chain has no such block), one request."""
        blocks = self.batch([("eth_getBlockByNumber", [hex(n), False]) for n in numbers])
        return [None if b is None else BlockHeader(int(b["number"], 16), b["hash"].lower(),
                                                   b["parentHash"].lower(), int(b["timestamp"], 16))
                for b in blocks]

    def logs(self, from_block: int, to_block: int, addresses: Sequence[str],
             topics: Sequence[str]) -> list[dict[str, Any]]:
        """The logs of `[from_block, to_block]`, asked in one request with the header of `to_block`: a node of
        a load-balanced RPC that is behind answers eth_getLogs with no logs for the blocks it lacks, as if
        they had none; one that lacks `to_block` is behind (RpcBehind), and its answer is not used."""
        flt = {"fromBlock": hex(from_block), "toBlock": hex(to_block), "address": list(addresses),
               "topics": [list(topics)]}
        last, logs = self.batch([("eth_getBlockByNumber", [hex(to_block), False]), ("eth_getLogs", [flt])])
        if last is None:
            raise RpcBehind("the node that answered eth_getLogs lacks the range's last block", to_block=to_block)
        return list(logs)


def _rpc_error(method: str, err: dict[str, Any]) -> Exception:
    message = str(err.get("message", ""))
    code = err.get("code")
    if method == "eth_getLogs" and (code == -32005 or _RANGE_TOO_LARGE.search(message)):
        return RangeTooLarge("provider refused the log range", provider_message=message[:300],
                             suggested_blocks=range_hint(message))
    if code == 429 or "rate limit" in message.lower():
        return RpcUnreachable("RPC rate limited", provider_message=message[:300])
    return RpcError("RPC error", method=method, rpc_code=code, provider_message=message[:300])
