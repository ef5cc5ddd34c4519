"""Our Triton paged decode attention against the SDPA gather path (`node.models.attention`).

Triton runs in its interpreter on a CPU (TRITON_INTERPRET=1, set by tests/conftest.py) and compiled on
a GPU: the first tests use the device at hand with small shapes; the `gpu` ones (run by
scripts/gpu_check.sh) use Llama-3-8B's attention shapes in bf16 and a CUDA graph. Caches hold random
values everywhere, blocks are handed out in a shuffled order, and the table entries past a sequence's
end point at blocks full of other data: the kernel must read only each sequence's own keys.
Tolerance: float32 |diff| <= 1e-4 (outputs are O(1)); 16-bit |diff| <= 2e-2 (the reference rounds
its probabilities to 16 bits, the kernel keeps float32 until the output).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (the dev extra installs it: a missing triton fails, never skips)

from node.models import attention
from node.models.attention import AttentionBatch, LayerAttention, dense_decode_group, paged_attention
from tests.models.padded_decode import padded_decode

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
          dtype: torch.dtype, device: torch.device, seed: int = 0,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, D], k/v caches [blocks, bs, KVH, D] and block tables [B, max_blocks] over shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in context_lens)
    num_blocks = len(context_lens) * max_blocks + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = order[: len(context_lens) * max_blocks].view(len(context_lens), max_blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g)
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), tables.to(device),
            torch.tensor(context_lens, dtype=torch.int32, device=device))


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
               context_lens: torch.Tensor, layer: LayerAttention) -> torch.Tensor:
    """The gather path on the CPU in float32: the decode group the engine builds, this step's key and
    value being the ones already at each sequence's last position (rewriting them changes nothing)."""
    q, k_cache, v_cache = q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float()
    tables, context_lens = tables.cpu(), context_lens.cpu()
    block_size = k_cache.shape[1]
    last = (context_lens.long() - 1)
    slots = tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size  # [B]
    k = k_cache.flatten(0, 1)[slots]  # [B, KVH, D]
    v = v_cache.flatten(0, 1)[slots]
    batch = AttentionBatch(kv_indices=slots, groups=(dense_decode_group(tables, context_lens, block_size),))
    return paged_attention(q, k, v, k_cache, v_cache, batch, layer)


def _check(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
           layer: LayerAttention, dtype: torch.dtype = torch.float32, device: torch.device = DEVICE,
           seed: int = 0) -> None:
    from node.models.triton_attention import paged_decode

    q, k_cache, v_cache, tables, lens = _case(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                              device, seed)
    out = paged_decode(q, k_cache, v_cache, tables, lens, layer.scale, softcap=layer.softcap, window=layer.window)
    expected = _reference(q, k_cache, v_cache, tables, lens, layer)
    assert out.shape == (len(context_lens), num_heads * head_dim) and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    error = (out.cpu().float() - expected).abs().max().item()
    assert error <= tolerance, (context_lens, error)


def _ragged(num_seqs: int, max_len: int, seed: int) -> list[int]:
    """Lengths 1..max_len with block and tile edges (1, 16, 17, 64, 65) among them."""
    rng = random.Random(seed)
    edges = [1, 16, 17, 64, 65, max_len]
    return [edges[i] if i < len(edges) and rng.random() < 0.5 else rng.randint(1, max_len) for i in range(num_seqs)]


@pytest.mark.parametrize("num_seqs", [1, 3, 8])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (6, 1)])
def test_decode_matches_the_gather_path_for_ragged_contexts_and_gqa(num_seqs: int, num_heads: int,
                                                                    num_kv_heads: int) -> None:
    lens = _ragged(num_seqs, 150, seed=num_seqs * 10 + num_heads)
    _check(lens, num_heads, num_kv_heads, head_dim=24, block_size=16, layer=LayerAttention(scale=24 ** -0.5),
           seed=num_seqs)


@pytest.mark.parametrize("block_size", [1, 8, 32, 256])
def test_any_block_size_is_read_through_the_table(block_size: int) -> None:
    _check([5, 70, 33, 300][: 4 if block_size < 256 else 3], 4, 2, head_dim=16, block_size=block_size,
           layer=LayerAttention(scale=0.3))


def test_heads_narrower_than_a_dot_tile() -> None:
    """Head dim 8 (padded to 16 inside, the padding masked) and a single cache head for 3 query heads."""
    _check([7, 66], 3, 1, head_dim=8, block_size=16, layer=LayerAttention(scale=8 ** -0.5))


def test_one_sequence_split_across_many_key_ranges() -> None:
    """A lone sequence with a long context: many splits, merged (the batch-1 decode case)."""
    from node.models.triton_attention import num_splits

    assert num_splits(1, 1, 600) > 4
    _check([600], 2, 1, head_dim=16, block_size=16, layer=LayerAttention(scale=0.25))


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 1, 20])
def test_soft_capping_and_sliding_window(softcap: float | None, window: int | None) -> None:
    """Gemma 2's layers: a cap of 2 bends most scores (scale 1 on unit-variance vectors)."""
    _check([3, 19, 90, 40], 4, 2, head_dim=16, block_size=16,
           layer=LayerAttention(scale=1.0, window=window, softcap=softcap))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_close_to_float32(dtype: torch.dtype) -> None:
    _check(_ragged(4, 100, seed=7), 8, 2, head_dim=32, block_size=16, layer=LayerAttention(scale=32 ** -0.5),
           dtype=dtype)


def test_cuda_decode_takes_flash_where_it_applies_and_our_kernel_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert [attention.decode_backend(cuda, bs) for bs in (16, 256)] == ["triton", "triton"]
    assert attention.decode_backend(cpu, 16) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(attention, "flash_has_softcap", lambda: False)  # flash-attn before 2.6
    assert [attention.decode_backend(cuda, bs) for bs in (16, 256, 512)] == ["triton", "flash", "flash"]
    assert attention.decode_backend(cpu, 256) == "sdpa"
    assert attention._dense_backend(cuda, 256, LayerAttention(scale=1.0, softcap=50.0)) == "triton"
    assert attention._dense_backend(cuda, 256, LayerAttention(scale=1.0, window=8)) == "flash"


@pytest.mark.parametrize("layer", [LayerAttention(scale=0.25), LayerAttention(scale=0.5, window=9, softcap=3.0)])
def test_paged_attention_routes_dense_decode_through_our_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                layer: LayerAttention) -> None:
    """The engine's entry point with the "triton" backend (what CUDA picks without flash-attn), on the
    CPU through the interpreter: the same answer as the gather path."""
    lens = [9, 40, 17]
    expected = _reference(*_case(lens, 4, 2, 16, 16, torch.float32, torch.device("cpu")), layer)
    monkeypatch.setattr(attention, "decode_backend", lambda device, block_size: "triton")
    routed = _reference(*_case(lens, 4, 2, 16, 16, torch.float32, torch.device("cpu")), layer)
    assert (routed - expected).abs().max().item() <= 1e-4
    assert not torch.equal(routed, expected)  # a different path: float sums in another order


def test_the_engines_padded_decode_step_through_our_kernel_matches_the_gather_path(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model stack as a CUDA graph replays it (static buffers, a padding row of context 1, block
    size 4), the kernel in the interpreter: the hidden states of the gather path."""
    step = padded_decode(tiny_model)
    with torch.inference_mode():
        gathered = step.graphs.run(step.batch).clone()  # bucket 4: one padding row
        monkeypatch.setattr(attention, "decode_backend", lambda device, block_size: "triton")
        ours = step.graphs.run(step.batch)
    assert (ours - gathered).abs().max().item() <= 1e-4 * max(1.0, gathered.abs().max().item())
    assert not torch.equal(ours, gathered)  # the kernel ran: its sums round differently


@pytest.mark.gpu
def test_on_cuda_llama3_shapes_in_bf16_match_the_gather_path() -> None:
    """Compiled on the card: 32 query heads over 8 cache heads, head dim 128, up to 2,048 cached tokens."""
    lens = _ragged(64, 2048, seed=11)
    _check(lens, 32, 8, head_dim=128, block_size=16, layer=LayerAttention(scale=128 ** -0.5),
           dtype=torch.bfloat16, device=torch.device("cuda"))
    _check([1, 4000, 257], 16, 2, head_dim=64, block_size=256, layer=LayerAttention(scale=0.125, window=300,
           softcap=30.0), dtype=torch.bfloat16, device=torch.device("cuda"))


@pytest.mark.gpu
def test_on_cuda_a_captured_graph_replays_new_contexts() -> None:
    """The pair of kernels inside a CUDA graph: new lengths and tables in the same buffers, right answers."""
    from node.models.triton_attention import paged_decode

    cuda = torch.device("cuda")
    q, k_cache, v_cache, tables, lens = _case([40, 300, 7], 8, 2, 64, 16, torch.bfloat16, cuda)
    paged_decode(q, k_cache, v_cache, tables, lens, 0.125)  # compiles before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    lens.copy_(torch.tensor([300, 2, 128], dtype=torch.int32))
    tables.copy_(tables.flip(0))
    graph.replay()
    expected = _reference(q, k_cache, v_cache, tables, lens, LayerAttention(scale=0.125))
    assert (out.float().cpu() - expected).abs().max().item() <= 2e-2
