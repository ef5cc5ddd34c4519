"""Adapter copies ordered by events: a step waits only for the copies of the adapters it uses, and a
slot is rewritten only after the steps that read it. The CPU runs the same bookkeeping with no-op
events (its copies are synchronous); the `gpu` test checks the orders on a real side stream."""

from __future__ import annotations

import pytest
import torch

from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.copy_stream import AdapterCopyStream
from node.lora.slots import LoRASlotPools

TARGET = LoRATargetSpec.of(2, {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                               "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)})


def _adapter(seed: int, rank: int = 4) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = dict(TARGET.module_shapes)
    return LoRAWeights.from_modules({(layer, m): (torch.randn(rank, shapes[m][0], generator=g),
                                                  torch.randn(shapes[m][1], rank, generator=g))
                                     for layer in range(2) for m in ("q_proj", "v_proj", "down_proj")})


def _pools(device: torch.device, num_slots: int = 2) -> LoRASlotPools:
    return LoRASlotPools.build(TARGET, ((4, num_slots),), torch.float32, device)


def test_a_step_waits_for_the_adapters_it_uses_still_loading_and_no_others() -> None:
    copies, pools = AdapterCopyStream(torch.device("cpu")), _pools(torch.device("cpu"))
    pools.activate("a", _adapter(1), in_use=(), copies=copies)  # staged ahead of its requests
    pools.activate("b", _adapter(2), in_use=(), copies=copies)
    assert copies.pending() == {"a", "b"}
    assert copies.wait_for({"b"}) == ["b"]  # this step uses b only: a's copy goes on
    assert copies.pending() == {"a"}
    assert copies.wait_for({"b"}) == []  # already waited for: nothing more
    assert copies.wait_for({"a", "b"}) == ["a"]
    assert copies.pending() == set()


def test_a_slot_read_by_a_step_is_rewritten_only_after_that_step() -> None:
    copies, pools = AdapterCopyStream(torch.device("cpu")), _pools(torch.device("cpu"))
    slot_a = pools.activate("a", _adapter(1), in_use=(), copies=copies)
    slot_b = pools.activate("b", _adapter(2), in_use=(), copies=copies)
    copies.wait_for({"a"})
    copies.record_use({slot_a})  # a step read a's slot
    assert copies.readers(slot_a) and not copies.readers(slot_b)
    slot_c = pools.activate("c", _adapter(3), in_use={"b"}, copies=copies)  # evicts a, idle now
    assert slot_c == slot_a and not copies.readers(slot_a)  # the write waited on that step, once
    assert copies.pending() == {"b", "c"}


def test_cpu_copies_are_the_same_weights_as_synchronous_ones() -> None:
    weights = _adapter(5)
    with_copies, plain = _pools(torch.device("cpu")), _pools(torch.device("cpu"))
    with_copies.activate("a", weights, in_use=(), copies=AdapterCopyStream(torch.device("cpu")))
    plain.activate("a", weights, in_use=())
    for group in with_copies.pools[0].a_all:
        assert torch.equal(with_copies.pools[0].a_all[group], plain.pools[0].a_all[group])
        assert torch.equal(with_copies.pools[0].b_all[group], plain.pools[0].b_all[group])


@pytest.mark.gpu
def test_on_cuda_copies_overlap_a_step_that_does_not_use_them_and_wait_for_one_that_read_their_slot() -> None:
    device = torch.device("cuda")
    copies, pools = AdapterCopyStream(device), _pools(device)
    slot_a = pools.activate("a", _adapter(1), in_use=(), copies=copies)
    copies.wait_for({"a"})
    torch.cuda.synchronize()
    main = torch.cuda.current_stream()
    torch.cuda._sleep(200_000_000)  # a long step on the main stream (~0.1 s)...
    seen = pools.pools[0].a_all["qkv"][:, slot_a].clone()  # ...that reads a's slot
    copies.record_use({slot_a})
    step_done = torch.cuda.Event()
    step_done.record(main)
    pools.activate("b", _adapter(2), in_use=(), copies=copies)  # a free slot: overlaps the step
    copies._ready["b"].synchronize()  # type: ignore[union-attr]
    assert not step_done.query()  # b's copy finished while the step still ran
    pools.activate("c", _adapter(3), in_use={"b"}, copies=copies)  # evicts a: waits for the step
    copies.wait_for({"b", "c"})
    torch.cuda.synchronize()
    expected = _pools(torch.device("cpu"))
    expected.activate("a", _adapter(1), in_use=())
    assert torch.equal(seen.cpu(), expected.pools[0].a_all["qkv"][:, 0])  # the step saw a, not c
