"""The batched shrink/expand ops against a float32 loop, in both forms, under skewed adapter traffic."""

from __future__ import annotations

import random

import pytest
import torch

from node.lora.mapping import build_plan, choose_form
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
@pytest.mark.parametrize("form", [None, "gather", "segment"])
def test_ops_match_the_float32_loop(kind: str, form: str | None) -> None:
    rng = random.Random(7)
    a, b = _weights(1)
    x = torch.randn(37, D_IN, generator=torch.Generator().manual_seed(2))
    token_slots = _traffic(kind, 37, rng)
    plan = build_plan(token_slots, torch.device("cpu"), form)  # type: ignore[arg-type]
    assert plan is not None
    out = torch.full((37, D_OUT + 5), 0.5)
    add_delta(out[:, 5:], expand(shrink(x, a, plan), b, plan), plan)  # into a column slice
    expected = 0.5 + reference_delta(x, a, b, token_slots)
    assert torch.allclose(out[:, 5:], expected, atol=1e-4)
    assert torch.equal(out[:, :5], torch.full((37, 5), 0.5))
    untouched = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[untouched], torch.full((len(untouched), D_OUT + 5), 0.5))


def test_no_plan_when_no_token_has_an_adapter() -> None:
    assert build_plan([-1, -1, -1], torch.device("cpu")) is None


def test_segments_are_runs_of_one_slot() -> None:
    plan = build_plan([2, -1, 0, 2, 0, 2], torch.device("cpu"))
    assert plan is not None
    assert plan.tokens.tolist() == [2, 4, 0, 3, 5] and plan.slots.tolist() == [0, 0, 2, 2, 2]
    assert plan.segments == ((0, 0, 2), (2, 2, 5))


def test_the_form_follows_the_traffic_and_the_device() -> None:
    assert choose_form(num_tokens=256, num_segments=1, device_type="cuda") == "segment"  # one adapter
    assert choose_form(num_tokens=256, num_segments=100, device_type="cuda") == "gather"  # many
    assert choose_form(num_tokens=256, num_segments=200, device_type="cpu") == "segment"


def test_bfloat16_ops_stay_close_to_float32() -> None:
    a, b = _weights(3)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(4))
    token_slots = [s % NUM_SLOTS for s in range(16)]
    for form in ("gather", "segment"):
        plan = build_plan(token_slots, torch.device("cpu"), form)  # type: ignore[arg-type]
        assert plan is not None
        out = torch.zeros(16, D_OUT, dtype=torch.bfloat16)
        add_delta(out, expand(shrink(x.bfloat16(), a.bfloat16(), plan), b.bfloat16(), plan), plan)
        expected = reference_delta(x, a, b, token_slots)
        assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
