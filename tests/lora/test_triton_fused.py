"""The fused LoRA kernels (one launch per group) against the float32 loop and the torch ops: in Triton's
interpreter on a CPU, compiled on a GPU (`gpu` mark).

Tolerance: float32 |diff| <= 1e-3 + 1e-4 |ref| (deltas are O(1)-O(10)); bf16 and fp16 outputs
|diff| <= 2e-2 * max(1, max |ref|) (the output is rounded once to 16 bits, 2^-8 relative for bf16;
inside, the kernels read the 16-bit weights exactly and accumulate in float32).
"""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch

from node.lora import ops
from node.lora.adapter import LoRATargetSpec
from node.lora.mapping import build_plan
from node.lora.slots import LoRASlotPools
from node.lora.weights import LoRAWeights
from node.models.config import ModelConfig
from tests.lora.test_triton_ops import DEVICE, _reference, _stacked, _traffic, kernels  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
# GQA: 10 query heads and 2 key/value heads of 16; hidden 160 spans two shrink blocks of the segment form
GQA = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 160, "intermediate_size": 96,
                             "num_hidden_layers": 1, "num_attention_heads": 10, "num_key_value_heads": 2,
                             "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
POOLS = ((4, 2), (16, 2))  # (rank, slots): global ids 0-1 in the rank-4 pool, 2-3 in the rank-16 one
ADAPTER_RANKS = {"r1": 1, "r4": 4, "r9": 9, "r16": 16}
WIDTHS = {"qkv": (150, 40, 40), "gate_up": (130, 130), "down": (70,)}  # several 64-column blocks, ragged


@pytest.fixture(scope="module")
def fused(kernels: ModuleType) -> ModuleType:  # noqa: F811  (the interpreter check of test_triton_ops)
    from node.lora import triton_fused

    return triton_fused


def _run(fused: ModuleType, form: str, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         widths: tuple[int, ...], ranks: list[int], token_slots: list[int], min_programs: int) -> None:
    """One fused launch on DEVICE, updating `out` (a CPU tensor) in place."""
    plan = build_plan(token_slots, DEVICE, form)  # type: ignore[arg-type]
    assert plan is not None
    r = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    x, a, b, result = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), out.to(DEVICE)
    if form == "gather":
        fused.lora_gather_fused(x, result, a, b, widths, r, plan.token_slots, min_programs=min_programs)
    else:
        fused.lora_segment_fused(x, result, a, b, widths, r, plan.run_table, plan.max_run_len,
                                 min_programs=min_programs)
    out.copy_(result.cpu())


@pytest.mark.parametrize(("form", "kind"), [("gather", "distinct"), ("gather", "zipf"), ("gather", "identical"),
                                            ("segment", "uniform"), ("segment", "zipf"), ("segment", "identical")])
def test_fused_kernels_match_the_float32_loop(fused: ModuleType, form: str, kind: str) -> None:
    """Each group with its own column split: one chunk per 64 columns, two uneven chunks, none."""
    from tests.lora.test_triton_ops import RANKS

    token_slots = _traffic(kind, 17, random.Random(hash(kind) % 1000))
    x = torch.randn(17, 40, generator=torch.Generator().manual_seed(3))
    for seed, ((group, widths), min_programs) in enumerate(zip(WIDTHS.items(), (10_000, 60, 1), strict=True)):
        a, b = _stacked(widths, seed)  # garbage beyond each slot's rank: never read
        out = torch.full((17, sum(widths)), 0.25)
        _run(fused, form, x, out, a, b, widths, RANKS, token_slots, min_programs)
        expected = 0.25 + _reference(x, a, b, widths, token_slots)
        assert torch.allclose(out, expected, atol=1e-3, rtol=1e-4), (group, (out - expected).abs().max())


def _adapter(rank: int, seed: int, round_to: torch.dtype) -> LoRAWeights:
    """Every projection of the GQA model, weights rounded to `round_to` (then held in float32)."""
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights.from_modules({
        (0, m): ((torch.randn(rank, d_in, generator=g) * d_in ** -0.5).to(round_to).float(),
                 (torch.randn(d_out, rank, generator=g) * 0.5).to(round_to).float())
        for m, (d_in, d_out) in GQA.module_shapes().items()})


def _pools(dtype: torch.dtype, round_to: torch.dtype, device: torch.device) -> tuple[LoRASlotPools, dict[str, int]]:
    pools = LoRASlotPools.build(LoRATargetSpec.of(1, GQA.module_shapes()), POOLS, dtype, device)
    ids = {name: pools.activate(name, _adapter(r, i, round_to), in_use=()) for i, (name, r)
           in enumerate(ADAPTER_RANKS.items())}
    assert sorted(ids.values()) == [0, 1, 2, 3]  # r1, r4 in the rank-4 pool; r9, r16 in the rank-16 one
    return pools, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["gather", "segment"])
def test_rank_pools_through_the_fused_kernels_match_the_torch_ops(fused: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                                  dtype: torch.dtype, form: str) -> None:
    """`apply_lora` as CUDA runs it (the fused kernels, forced here), GQA-shaped q/k/v and every other
    group, two rank pools, ragged slots with base-only rows, against the float32 torch path."""
    reference, ids = _pools(torch.float32, dtype, torch.device("cpu"))
    pools, _ = _pools(dtype, dtype, DEVICE)
    names = ["r16", None, "r1", "r9", "r9", None, "r4", "r16", "r1", "r1", "r16", "r4"]
    token_slots = [ids[n] if n else -1 for n in names]
    if form == "segment":
        token_slots.sort()
    hidden = {"qkv": GQA.hidden_size, "o": GQA.q_size, "gate_up": GQA.hidden_size, "down": GQA.intermediate_size}
    x_all = {g: torch.randn(len(names), d).to(dtype).float() for g, d in hidden.items()}
    expected = {}
    for group, x in x_all.items():
        out = torch.ones(len(names), sum(reference.pools[0].widths[group]))
        reference.batch(token_slots, form).apply(0, group, x, out)  # type: ignore[union-attr,arg-type]
        expected[group] = out
    monkeypatch.setattr(ops, "uses_triton", lambda device: True)
    if DEVICE.type == "cpu":
        monkeypatch.setattr(fused, "MIN_PROGRAMS", 1)  # no column split: fewer programs to interpret
    batch = pools.batch(token_slots, form)  # type: ignore[arg-type]
    assert batch is not None and len(batch.parts) == 2
    for group, x in x_all.items():
        out = torch.ones(len(names), expected[group].shape[1], dtype=dtype, device=DEVICE)
        batch.apply(0, group, x.to(dtype).to(DEVICE), out)
        got, want = out.float().cpu(), expected[group]
        tolerance = 1e-3 + 1e-4 * want.abs() if dtype == torch.float32 else 2e-2 * max(1.0, want.abs().max().item())
        assert ((got - want).abs() <= tolerance).all(), (group, (got - want).abs().max())
        base_rows = [t for t, s in enumerate(token_slots) if s < 0]
        assert (got[base_rows] == 1).all()  # base-only rows untouched


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["gather", "segment"])
def test_compiled_fused_kernels_on_llama3_8b_shapes_match_the_torch_ops(form: str) -> None:
    """CUDA: Llama-3-8B's group shapes (q/k/v 4096/1024/1024, gate/up 14336, down in 14336), bf16, 16 slots
    of mixed ranks, 64 tokens; the gather form also replayed from a CUDA graph with new slot ids."""
    from node.lora import triton_fused

    cuda, widths, d_in, n = torch.device("cuda"), (4096, 1024, 1024), 4096, 64
    g = torch.Generator(device=cuda).manual_seed(0)
    a = (torch.randn(16, 3 * 16, d_in, device=cuda, generator=g) * d_in ** -0.5).bfloat16()
    b = (torch.randn(16, sum(widths), 16, device=cuda, generator=g) * 0.1).bfloat16()
    ranks = torch.tensor([16, 8] * 8, dtype=torch.int32, device=cuda)
    a.view(16, 3, 16, d_in)[1::2, :, 8:] = 0  # what the torch ops read where the kernel skips the padding
    b[1::2, :, 8:] = 0
    x = torch.randn(n, d_in, device=cuda).bfloat16()
    slots = sorted(random.Random(1).choices([-1, *range(16)], k=n))
    plan = build_plan(slots, cuda, form)  # type: ignore[arg-type]
    assert plan is not None
    want = _torch_delta(x, a, b, widths, slots, form)
    out = torch.zeros(n, sum(widths), dtype=torch.bfloat16, device=cuda)
    ops.apply_lora(x, out, a, b, widths, ranks, plan)
    assert (out.float() - want).abs().max() <= 2e-2 * max(1.0, want.abs().max().item())
    if form == "gather":
        token_slots = plan.token_slots.clone()
        graph = torch.cuda.CUDAGraph()
        out.zero_()
        with torch.cuda.graph(graph):
            triton_fused.lora_gather_fused(x, out, a, b, widths, ranks, token_slots)
        token_slots.copy_(torch.flip(plan.token_slots, [0]))
        out.zero_()
        graph.replay()
        flipped = _torch_delta(x, a, b, widths, slots[::-1], "gather")
        assert (out.float() - flipped).abs().max() <= 2e-2 * max(1.0, flipped.abs().max().item())


def _torch_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, widths: tuple[int, ...], slots: list[int],
                 form: str) -> torch.Tensor:
    """The torch ops in float32 (their rank is the padded one: zeros beyond each slot's rank)."""
    plan = build_plan(slots, x.device, form)  # type: ignore[arg-type]
    assert plan is not None
    delta = torch.zeros(x.shape[0], sum(widths), device=x.device)
    bs = list(b.float().split(list(widths), 1))
    if form == "gather":
        ops._gather(x.float(), delta, a.float(), bs, plan, b.shape[2])
    else:
        ops._segment(x.float(), delta, a.float(), bs, plan.runs, b.shape[2])
    return delta
