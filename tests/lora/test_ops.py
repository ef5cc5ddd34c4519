"""The batched shrink/expand ops against a float32 loop, in both forms, under skewed adapter traffic."""

from __future__ import annotations

import random

import pytest
import torch

from node.lora.mapping import build_plan, choose_form
from node.lora.ops import apply_lora, reference_delta

NUM_SLOTS, RANK, D_IN, D_OUT = 6, 8, 32, 24
RANKS = torch.tensor([RANK, RANK, RANK, 4, RANK, RANK], dtype=torch.int32)


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
    """Two projections share the input (like gate/up): their deltas land in their own columns."""
    rng = random.Random(7)
    a1, b1 = _weights(1)
    a2, b2 = _weights(5)
    x = torch.randn(37, D_IN, generator=torch.Generator().manual_seed(2))
    token_slots = _traffic(kind, 37, rng)
    plan = build_plan(token_slots, torch.device("cpu"), form)  # type: ignore[arg-type]
    assert plan is not None
    out = torch.full((37, 2 * D_OUT), 0.5)
    apply_lora(x, out, torch.cat([a1, a2], dim=1), torch.cat([b1, b2], dim=1), (D_OUT, D_OUT), RANKS, plan)
    assert torch.allclose(out[:, :D_OUT], 0.5 + reference_delta(x, a1, b1, token_slots), atol=1e-4)
    assert torch.allclose(out[:, D_OUT:], 0.5 + reference_delta(x, a2, b2, token_slots), atol=1e-4)
    untouched = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[untouched], torch.full((len(untouched), 2 * D_OUT), 0.5))


def test_no_plan_when_no_token_has_an_adapter() -> None:
    assert build_plan([-1, -1, -1], torch.device("cpu")) is None


def test_runs_are_consecutive_tokens_of_one_slot() -> None:
    plan = build_plan([2, 2, -1, 0, 0, 2], torch.device("cpu"))
    assert plan is not None
    assert plan.tokens.tolist() == [0, 1, 3, 4, 5] and plan.slots.tolist() == [2, 2, 0, 0, 2]
    assert plan.runs == ((2, 0, 2), (0, 3, 5), (2, 5, 6))
    assert plan.run_table.tolist() == [[2, 0, 2], [0, 3, 5], [2, 5, 6]] and plan.max_run_len == 2
    assert plan.token_slots.tolist() == [2, 2, -1, 0, 0, 2]


def test_the_form_follows_the_traffic_and_the_device() -> None:
    assert choose_form(num_tokens=256, num_runs=1, device_type="cuda") == "segment"  # one adapter
    assert choose_form(num_tokens=256, num_runs=100, device_type="cuda") == "gather"  # many
    assert choose_form(num_tokens=256, num_runs=200, device_type="cpu") == "segment"
    assert choose_form(num_tokens=512, num_runs=2, device_type="cuda", is_triton=True) == "segment"  # prefill
    assert choose_form(num_tokens=256, num_runs=64, device_type="cuda", is_triton=True) == "gather"  # decode


def test_bfloat16_ops_stay_close_to_float32() -> None:
    a, b = _weights(3)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(4))
    token_slots = [s % NUM_SLOTS for s in range(16)]
    expected = reference_delta(x, a, b, token_slots)
    for form in ("gather", "segment"):
        plan = build_plan(token_slots, torch.device("cpu"), form)  # type: ignore[arg-type]
        assert plan is not None
        out = torch.zeros(16, D_OUT, dtype=torch.bfloat16)
        apply_lora(x.bfloat16(), out, a.bfloat16(), b.bfloat16(), (D_OUT,), RANKS, plan)
        assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
