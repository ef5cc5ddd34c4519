"""Device slots: copy-in, LRU eviction of idle adapters only, rank padding, and the LoRA hook."""

from __future__ import annotations

import pytest
import torch

from node.errors import Overloaded
from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.mapping import build_plan
from node.lora.slots import LoRABatch, LoRASlots

TARGET = LoRATargetSpec.of(1, {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
                               "gate_proj": (8, 12), "up_proj": (8, 12), "down_proj": (12, 8)})


def _adapter(rank: int, seed: int, modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
             ) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = dict(TARGET.module_shapes)
    return LoRAWeights.from_modules({
        (0, m): (torch.randn(rank, shapes[m][0], generator=g), torch.randn(shapes[m][1], rank, generator=g))
        for m in modules})


def _slots(num_slots: int = 2) -> LoRASlots:
    return LoRASlots(TARGET, num_slots=num_slots, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))


def test_least_recently_used_idle_adapter_is_evicted() -> None:
    slots = _slots()
    s_a = slots.activate("a", _adapter(2, 1), in_use=())
    s_b = slots.activate("b", _adapter(4, 2), in_use=())
    assert slots.activate("a", _adapter(2, 1), in_use=()) == s_a  # resident: no copy, now most recent
    assert slots.activate("c", _adapter(2, 3), in_use={"a"}) == s_b  # b was least recent and idle
    assert set(slots.slot_of) == {"a", "c"}


def test_adapters_in_use_are_never_evicted() -> None:
    slots = _slots()
    slots.activate("a", _adapter(2, 1), in_use=())
    slots.activate("b", _adapter(2, 2), in_use=())
    with pytest.raises(Overloaded):
        slots.activate("c", _adapter(2, 3), in_use={"a", "b"})


def test_the_hook_adds_each_projection_delta_with_rank_padding() -> None:
    slots = _slots()
    low, high = _adapter(2, 1), _adapter(4, 2)
    slot_low = slots.activate("low", low, in_use=())
    slot_high = slots.activate("high", high, in_use=())
    x = torch.randn(3, 8)
    qkv = torch.zeros(3, 16)  # q 8 + k 4 + v 4, fused
    plan = build_plan([slot_low, -1, slot_high], torch.device("cpu"))
    assert plan is not None
    LoRABatch([(slots, plan)]).apply(0, "qkv", x, qkv)
    for row, w in ((0, low), (2, high)):
        a_q, b_q = w.modules[(0, "q_proj")]
        a_v, b_v = w.modules[(0, "v_proj")]
        assert torch.allclose(qkv[row, :8], b_q @ (a_q @ x[row]), atol=1e-5)
        assert torch.equal(qkv[row, 8:12], torch.zeros(4))  # k_proj not targeted
        assert torch.allclose(qkv[row, 12:], b_v @ (a_v @ x[row]), atol=1e-5)
    assert torch.equal(qkv[1], torch.zeros(16))  # the base-only token


def test_a_reused_slot_holds_no_trace_of_its_previous_adapter() -> None:
    slots = _slots(num_slots=1)
    slots.activate("full", _adapter(4, 1, modules=("q_proj", "k_proj", "v_proj")), in_use=())
    slot = slots.activate("small", _adapter(2, 2, modules=("v_proj",)), in_use=())
    assert torch.equal(slots.a[0]["qkv"][slot, :8], torch.zeros(8, 8))  # q and k parts cleared
    assert torch.equal(slots.b[0]["q_proj"][slot], torch.zeros(8, 4))
    assert torch.equal(slots.a[0]["qkv"][slot, 10:], torch.zeros(2, 8))  # v beyond rank 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_slot_copy_applies_the_lora_scaling_as_scaling_on_the_host_did(dtype: torch.dtype) -> None:
    """An adapter whose B stacks wait for their scaling (`b_scale`) lands in its slot with exactly the
    values of the same adapter scaled on the host: the product in float32, then the slot's dtype."""
    raw = _adapter(4, 1)
    waiting = LoRAWeights(rank=raw.rank, a=raw.a, b=raw.b, ranks=raw.ranks, b_scale=0.37)
    scaled = LoRAWeights(rank=raw.rank, a=raw.a, b={m: t * 0.37 for m, t in raw.b.items()}, ranks=raw.ranks)
    pools = [LoRASlots(TARGET, num_slots=1, max_rank=4, dtype=dtype, device=torch.device("cpu")) for _ in range(2)]
    pools[0].activate("waiting", waiting, in_use=())
    pools[1].activate("scaled", scaled, in_use=())
    assert all(torch.equal(x, y) for x, y in zip(pools[0].b_all.values(), pools[1].b_all.values(), strict=True))
    assert any(bool(t.any()) for t in pools[0].b_all.values())
    assert torch.equal(waiting.modules[(0, "q_proj")][1], scaled.modules[(0, "q_proj")][1])


def test_a_slot_rewritten_by_adapters_of_one_layout_holds_exactly_the_last_one() -> None:
    """Adapters of the slot's full shape and the same modules overwrite each other without clearing
    (`_write`'s short way); one of another layout in between is cleared and written the long way."""
    slots, alone = _slots(num_slots=1), _slots(num_slots=1)
    scaled = _adapter(4, 3)
    scaled = LoRAWeights(rank=4, a=scaled.a, b=scaled.b, ranks=scaled.ranks, b_scale=0.5)
    for name, weights in (("a", _adapter(4, 1)), ("small", _adapter(2, 2, ("v_proj",))), ("b", _adapter(4, 4)),
                          ("c", scaled), ("d", _adapter(4, 5))):
        slots.remove(next(iter(slots.slot_of), ""))
        alone.remove(next(iter(alone.slot_of), ""))
        slots.activate(name, weights, in_use=())
        alone._full_layout[0] = None  # the long way, always
        alone.activate(name, weights, in_use=())
        for mine, theirs in ((slots.a_all, alone.a_all), (slots.b_all, alone.b_all)):
            assert all(torch.equal(mine[g], theirs[g]) for g in mine), name
    a_q, b_q = _adapter(4, 5).modules[(0, "q_proj")]
    assert torch.equal(slots.a[0]["qkv"][0, :4], a_q) and torch.equal(slots.b[0]["q_proj"][0], b_q)
