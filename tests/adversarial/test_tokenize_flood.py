"""Free tokenization cannot hold up the paid path's holds and charges.

Anyone may ask for a quote, with no key and no escrow, and a quote tokenizes its prompt: a long one on a
worker thread. The holds and charges of paid requests ran on the same threads (the event loop's default
executor), behind every tokenization queued before them, so a stranger keeping a few hundred quotes of
the longest prompt tokenized in flight made every paying user wait for that whole queue, twice (hold,
then charge). Now the paid path's database work has threads of its own. Live node on anvil; the flood
comes from a process of its own, as it would from another machine."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import time

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.flood import fastest_paid_seconds, signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
NUM_FLOODING = 256  # quotes in flight at once: a stranger's few hundred connections
FLOOD = """
import asyncio, json, sys
import aiohttp

async def main(url, bodies, num):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=num)) as session:
        async def ask(i):
            while True:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if i == 0:
                        print(resp.status, flush=True)
        await asyncio.gather(*(ask(i) for i in range(num)))

asyncio.run(main(sys.argv[1], [b.encode() for b in json.loads(sys.stdin.readline())], int(sys.argv[2])))
"""


def _long_prompt(rng: random.Random, num_chars: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(4_000)]
    text = ""
    while len(text) < num_chars:
        text += " ".join(rng.choices(words, k=1_000)) + " "
    return text[:num_chars]


def test_a_flood_of_free_long_quotes_does_not_hold_up_paid_requests(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, payer, 700))
    headers = signed_completions(paid_node, payer, 710)  # signed before the flood: only paid requests are timed
    rng = random.Random(7)
    num_chars = paid_node.local.services.engine.max_prompt_chars - 8  # the longest tokenized (then refused)
    bodies = [json.dumps({"model": str(paid_node.adapter_id), "prompt": _long_prompt(rng, num_chars),
                          "max_tokens": 1}) for _ in range(4)]
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, f"{paid_node.base_url}/v1/quote/completions",
                              str(NUM_FLOODING)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdin is not None and flood.stdout is not None
        flood.stdin.write(json.dumps(bodies) + "\n")
        flood.stdin.flush()
        for _ in range(3):  # the flood's first quotes answered: every connection's is queued by now
            assert flood.stdout.readline().strip() == "413"  # too many tokens for the context, once counted
        flooded = fastest_paid_seconds(paid_node, headers)
        started = time.monotonic()  # one more free quote: how long the flood's queue is
        assert httpx.post(f"{paid_node.base_url}/v1/quote/completions", content=bodies[0], timeout=120,
                          headers={"Content-Type": "application/json"}).status_code == 413
        queued = time.monotonic() - started
    finally:
        flood.kill()
        flood.wait()
    print(f"paid request alone {calm:.3f} s, during the flood {flooded:.3f} s, a free quote then {queued:.3f} s")
    # the paid request shares the CPUs with the flood, not its queue: a fraction of the quote's wait (it was
    # more than the whole of it, its hold and its charge each queued behind the tokenizations; on a quiet box
    # the fraction is 0.2-0.35, so a third failed one run in four)
    assert flooded < queued / 2, f"a paid request took {flooded:.2f} s during a flood of free quotes " \
                                 f"({calm:.2f} s without; a quote waited {queued:.2f} s)"
