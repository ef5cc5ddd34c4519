"""The Triton LoRA kernels against a float32 loop: in Triton's interpreter on a CPU, compiled on a GPU.

Triton picks the interpreter when it is imported (TRITON_INTERPRET=1, set by tests/conftest.py on a
machine without CUDA). The padded part of every slot beyond its true rank holds garbage here: the
kernels must never read it (they honor `ranks`), while the reference uses only the first `rank` columns.
"""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch
import triton  # noqa: F401  (the dev extra installs it: a missing triton fails, never skips)

from node.lora.mapping import build_plan

# Triton's interpreter turns 1-element arrays into scalars (NumPy < 2.4 warns; 2.4 refuses: pinned in pyproject)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

NUM_SLOTS, MAX_RANK, D_IN = 6, 8, 40  # D_IN is not a multiple of the kernels' K block
RANKS = [8, 4, 1, 8, 6, 3]
WIDTHS = {"qkv": (24, 10, 10), "gate_up": (12, 12), "down": (19,)}


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    import triton.language as tl

    from node.lora import triton_ops

    interpreted = type(tl.zeros).__name__ == "InterpretedFunction"
    if DEVICE.type == "cpu" and not interpreted:
        pytest.fail("Triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it before any import)")
    return triton_ops


def _stacked(widths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, G * R, in] and B [S, sum widths, R], garbage beyond each slot's rank."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(NUM_SLOTS, len(widths) * MAX_RANK, D_IN, generator=g)
    b = torch.randn(NUM_SLOTS, sum(widths), MAX_RANK, generator=g)
    for s, r in enumerate(RANKS):
        for p in range(len(widths)):
            a[s, p * MAX_RANK + r:(p + 1) * MAX_RANK] = 1e3  # must never be read
        b[s, :, r:] = -1e3
    return a, b


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, widths: tuple[int, ...],
               token_slots: list[int]) -> torch.Tensor:
    """The float32 loop over tokens and projections, with each slot's weights cut to its rank."""
    delta = torch.zeros(x.shape[0], sum(widths))
    for t, s in enumerate(token_slots):
        if s < 0:
            continue
        r, col = RANKS[s], 0
        for p, width in enumerate(widths):
            a_p = a[s, p * MAX_RANK:p * MAX_RANK + r].double()  # [r, in]
            b_p = b[s, col:col + width, :r].double()  # [width, r]
            delta[t, col:col + width] = (b_p @ (a_p @ x[t].double())).float()
            col += width
    return delta


def _traffic(kind: str, num_tokens: int, rng: random.Random) -> list[int]:
    """Adapter popularity: which slot (-1: base only) each batch token uses, ordered by slot like the runner."""
    if kind == "distinct":
        slots = [t % NUM_SLOTS for t in range(num_tokens)]
    elif kind == "identical":
        slots = [2] * num_tokens
    elif kind == "zipf":
        weights = [1 / (k + 1) ** 1.1 for k in range(NUM_SLOTS + 1)]
        slots = rng.choices([0, -1, 1, 3, 5, 4, 2], weights=weights, k=num_tokens)
    else:
        slots = rng.choices([-1, *range(NUM_SLOTS)], k=num_tokens)
    return sorted(slots) if kind != "distinct" else slots


def _run(kernels: ModuleType, form: str, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         widths: tuple[int, ...], token_slots: list[int]) -> None:
    """Run one form on DEVICE, updating `out` (a CPU tensor) in place."""
    plan = build_plan(token_slots, DEVICE, form)  # type: ignore[arg-type]
    assert plan is not None
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    x, a, b, result = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), out.to(DEVICE)
    if form == "gather":
        kernels.lora_gather(x, result, a, b, widths, ranks, plan.token_slots)
    else:
        kernels.lora_segment(x, result, a, b, widths, ranks, plan.run_table, plan.max_run_len)
    out.copy_(result.cpu())


@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("form", ["gather", "segment"])
def test_kernels_match_the_float32_loop(kernels: ModuleType, kind: str, form: str) -> None:
    rng = random.Random(hash(kind) % 1000)
    num_tokens = 17  # identical: one run over two 16-token segment tiles
    token_slots = _traffic(kind, num_tokens, rng)
    x = torch.randn(num_tokens, D_IN, generator=torch.Generator().manual_seed(3))
    for seed, (group, widths) in enumerate(WIDTHS.items()):
        a, b = _stacked(widths, seed)
        out = torch.full((num_tokens, sum(widths)), 0.25)
        _run(kernels, form, x, out, a, b, widths, token_slots)
        expected = 0.25 + _reference(x, a, b, widths, token_slots)
        assert torch.allclose(out, expected, atol=1e-3, rtol=1e-4), (group, (out - expected).abs().max())


@pytest.mark.parametrize("form", ["gather", "segment"])
def test_base_only_rows_are_left_untouched(kernels: ModuleType, form: str) -> None:
    token_slots = [-1, -1, 4, 4, -1, 0, -1]
    x = torch.randn(len(token_slots), D_IN)
    a, b = _stacked(WIDTHS["gate_up"], 9)
    out = torch.randn(len(token_slots), 24)
    before = out.clone()
    _run(kernels, form, x, out, a, b, WIDTHS["gate_up"], token_slots)
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base_rows], before[base_rows])
    assert not torch.equal(out[[2, 3, 5]], before[[2, 3, 5]])


def test_a_rank_one_adapter_alone(kernels: ModuleType) -> None:
    """One token on the rank-1 slot: the smallest work the kernels do, and a one-token run."""
    x = torch.randn(1, D_IN)
    a, b = _stacked(WIDTHS["down"], 4)
    for form in ("gather", "segment"):
        out = torch.zeros(1, 19)
        _run(kernels, form, x, out, a, b, WIDTHS["down"], [2])
        assert torch.allclose(out, _reference(x, a, b, WIDTHS["down"], [2]), atol=1e-4)


@pytest.mark.parametrize("form", ["gather", "segment"])
def test_half_precision_stays_close_to_float32(kernels: ModuleType, form: str) -> None:
    """fp16 inputs and output (numpy has no bfloat16), float32 accumulation inside."""
    token_slots = _traffic("zipf", 18, random.Random(5))
    x = torch.randn(18, D_IN) * 0.5
    a, b = _stacked(WIDTHS["qkv"], 6)
    a, b = a.clamp(-4, 4) / D_IN ** 0.5, b.clamp(-4, 4) / MAX_RANK  # keep the garbage inside fp16 range
    out = torch.zeros(18, 44, dtype=torch.float16)
    _run(kernels, form, x.half(), out, a.half(), b.half(), WIDTHS["qkv"], token_slots)
    expected = _reference(x.half().float(), a.half().float(), b.half().float(), WIDTHS["qkv"], token_slots)
    assert (out.float() - expected).abs().max() < 2e-2 * max(1.0, expected.abs().max().item())
