"""The batched shrink/expand ops against a float32 loop, in both forms, under skewed adapter traffic."""

from __future__ import annotations

import random

import pytest
import torch

from node.lora.mapping import build_plan, choose_chunk_size
from node.lora.ops import add_delta, expand, reference_delta, shrink

NUM_SLOTS, RANK, D_IN, D_OUT = 6, 8, 32, 24


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(NUM_SLOTS, RANK, D_IN, generator=g)
    b = torch.randn(NUM_SLOTS, D_OUT, RANK, generator=g)
    a[3, 4:] = 0  # slot 3 holds a rank-4 adapter, zero-padded to the slot rank
    b[3, :, 4:] = 0
    return a, b


def _traffic(kind: str, num_tokens: int, rng: random.Random) -> list[int]:
    if kind == "distinct":
        return [t % NUM_SLOTS for t in range(num_tokens)]
    if kind == "identical":
        return [2] * num_tokens
    if kind == "skewed":  # Zipf-like, with base-only tokens (-1) mixed in
        return rng.choices([-1, 0, 1, 3, 5], weights=[3, 20, 5, 2, 1], k=num_tokens)
    return rng.choices([-1, *range(NUM_SLOTS)], k=num_tokens)


@pytest.mark.parametrize("kind", ["distinct", "identical", "skewed", "uniform"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 64])
def test_ops_match_the_float32_loop(kind: str, chunk_size: int | None) -> None:
    rng = random.Random(7)
    a, b = _weights(1)
    x = torch.randn(37, D_IN, generator=torch.Generator().manual_seed(2))
    token_slots = _traffic(kind, 37, rng)
    plan = build_plan(token_slots, torch.device("cpu"), chunk_size)
    assert plan is not None
    out = torch.full((37, D_OUT), 0.5)
    add_delta(out, expand(shrink(x, a, plan), b, plan), plan)
    expected = 0.5 + reference_delta(x, a, b, token_slots)
    assert torch.allclose(out, expected, atol=1e-4)
    untouched = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[untouched], torch.full((len(untouched), D_OUT), 0.5))


def test_no_plan_when_no_token_has_an_adapter() -> None:
    assert build_plan([-1, -1, -1], torch.device("cpu")) is None


def test_chunk_size_follows_the_traffic() -> None:
    assert choose_chunk_size([1] * 64, "cpu") == 1  # every token its own adapter: gather form
    assert choose_chunk_size([256], "cpu") == 128  # one adapter for all: segmented form
    assert choose_chunk_size([200, 1, 1, 1, 1], "cpu") > 1


def test_bfloat16_ops_stay_close_to_float32() -> None:
    a, b = _weights(3)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(4))
    token_slots = [s % NUM_SLOTS for s in range(16)]
    plan = build_plan(token_slots, torch.device("cpu"))
    assert plan is not None
    out = torch.zeros(16, D_OUT, dtype=torch.bfloat16)
    add_delta(out, expand(shrink(x.bfloat16(), a.bfloat16(), plan), b.bfloat16(), plan), plan)
    expected = reference_delta(x, a, b, token_slots)
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
