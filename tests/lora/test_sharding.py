"""LoRA split to match a tensor-parallel base: each rank's part of the delta, added where its base
output lives, adds up to the whole delta (column-parallel: the rank's rows; row-parallel: summed, as
the base's all-reduce sums it), for mixed ranks on all seven projections, with rank 0 deciding the
slots and a worker writing its parts into the same ones."""

from __future__ import annotations

import torch

from node.engine.tp_runner import lora_shard
from node.lora.adapter import GROUPS, LoRATargetSpec, LoRAWeights
from node.lora.sharding import ShardedLoRASlotPools
from node.lora.slots import LoRASlotPools, LoRASlots
from node.models.config import ModelConfig
from node.models.parallel import ShardPlan

CFG = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
SIZE = 2
CPU = torch.device("cpu")


def _adapter(rank: int, seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = CFG.module_shapes()
    return LoRAWeights.from_modules({
        (layer, m): (torch.randn(rank, shapes[m][0], generator=g), torch.randn(shapes[m][1], rank, generator=g))
        for layer in range(CFG.num_layers) for m in shapes}, scales={(0, "q_proj"): 0.5})


def _pools(cfg: ModelConfig) -> list[LoRASlots]:
    target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())
    return [LoRASlots(target, 2, 4, torch.float32, CPU), LoRASlots(target, 1, 8, torch.float32, CPU)]


def _columns(plan: ShardPlan, group: str) -> list[int]:
    """The columns of the group's whole fused output that this rank's fused output holds."""
    ranges = {"qkv": [plan.q_rows(), plan.kv_rows(), plan.kv_rows()], "gate_up": [plan.intermediate_rows()] * 2}
    widths = [CFG.q_size, CFG.kv_size, CFG.kv_size] if group == "qkv" else [CFG.intermediate_size] * 2
    cols, offset = [], 0
    for (start, end), width in zip(ranges[group], widths, strict=True):
        cols.extend(range(offset + start, offset + end))
        offset += width
    return cols


def test_every_ranks_part_of_the_delta_adds_up_to_the_whole_delta() -> None:
    plans = [ShardPlan.of(CFG, rank, SIZE) for rank in range(SIZE)]
    shards = tuple(lora_shard(p) for p in plans)
    whole = LoRASlotPools(_pools(CFG))
    rank0 = ShardedLoRASlotPools(_pools(plans[0].local_config()), shards)
    rank1 = LoRASlotPools(_pools(plans[1].local_config()))
    adapters = {"r2": _adapter(2, 1), "r8": _adapter(8, 2), "r4": _adapter(4, 3)}
    slots = {name: rank0.activate(name, w, in_use=()) for name, w in adapters.items()}
    assert rank0.activate("r8", adapters["r8"], in_use=()) == slots["r8"] and rank0.num_pending == 3
    for slot, part in rank0.take_writes()[1]:  # what rank 1 gets scattered, written to rank 0's slots
        rank1.write(slot, part)
    for name, w in adapters.items():
        assert whole.activate(name, w, in_use=()) == slots[name]
    token_slots = [slots["r8"], -1, slots["r2"], slots["r2"], slots["r4"]]
    g = torch.Generator().manual_seed(9)
    for layer in range(CFG.num_layers):
        for group, modules in GROUPS.items():
            d_in, width = CFG.module_shapes()[modules[0]][0], sum(CFG.module_shapes()[m][1] for m in modules)
            x = torch.randn(len(token_slots), d_in, generator=g)
            expected = torch.zeros(len(token_slots), width)
            whole.batch(token_slots).apply(layer, group, x, expected)  # type: ignore[union-attr]
            parts = []
            for plan, pools in zip(plans, (rank0, rank1), strict=True):
                target = LoRATargetSpec.of(CFG.num_layers, plan.local_config().module_shapes())
                x_rank = x
                if group in ("o", "down"):
                    start, end = plan.q_rows() if group == "o" else plan.intermediate_rows()
                    x_rank = x[:, start:end]
                out = torch.zeros(len(token_slots), sum(target.shape(m)[1] for m in modules))
                pools.batch(token_slots).apply(layer, group, x_rank, out)  # type: ignore[union-attr]
                parts.append(out)
            if group in ("o", "down"):  # row-parallel: the all-reduce of the base output sums them
                torch.testing.assert_close(parts[0] + parts[1], expected, rtol=1e-5, atol=1e-5)
            else:
                for plan, part in zip(plans, parts, strict=True):
                    torch.testing.assert_close(part, expected[:, _columns(plan, group)], rtol=1e-5, atol=1e-5)
    assert expected[1].abs().sum() == 0 < expected[0].abs().sum()  # the base-model token got no delta


def test_a_part_is_a_tensor_of_its_own_not_a_view_of_the_whole_adapter() -> None:
    part = lora_shard(ShardPlan.of(CFG, 1, SIZE)).of(_adapter(4, 5))
    for t in (*part.a.values(), *part.b.values()):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert part.a["o"].shape[-1] == CFG.q_size // SIZE and part.b["down_proj"].shape[1] == CFG.hidden_size
