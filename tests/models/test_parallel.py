"""How a model is split across tensor-parallel ranks: what each rank reads of the checkpoint, and
which models are refused before any process starts."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch

from node.devkit import make_tiny_model
from node.engine.tp_group import TensorParallelGroup
from node.errors import ConfigError
from node.models.config import ModelConfig
from node.models.loader import load_model
from node.models.parallel import ShardPlan
from node.models.shard_loader import load_shard

CPU = torch.device("cpu")


def _shards(folder: Path, size: int) -> list[torch.nn.Module]:
    cfg = ModelConfig.from_folder(folder)
    return [load_shard(folder, ShardPlan.of(cfg, rank, size), torch.float32, CPU, 64,
                       TensorParallelGroup(rank, size, CPU)) for rank in range(size)]


SLICED = {  # a vocabulary of 511 (padded to 512 to split); one KV head over 2 ranks (replicated)
    "qwen2-bias-tied-1kv": dict(arch="qwen2", num_kv_heads=1, vocab_size=511, tie_embeddings=True),
    "phi3-fused": dict(arch="phi3", vocab_size=511),  # q|k|v and gate|up fused in the checkpoint
    "gemma3-qk-norms": dict(arch="gemma3_text", num_kv_heads=1, random_norms=True),
}


@pytest.mark.parametrize("variant", sorted(SLICED))
def test_the_ranks_slices_put_back_together_are_the_checkpoint(variant: str, tmp_path: Path) -> None:
    """Every weight is read exactly where it belongs: q/k/v and gate/up by output rows (Phi-3's from
    its fused tensors), o and down by input columns, norms (Gemma's four, per-head q/k norms) whole."""
    folder = make_tiny_model(tmp_path, **SLICED[variant])  # type: ignore[arg-type]
    whole = load_model(folder, torch.float32, CPU, 64)
    ranks = _shards(folder, 2)
    cfg = whole.cfg
    q, kv, i = cfg.q_size // 2, cfg.kv_size // min(2, cfg.num_kv_heads), cfg.intermediate_size // 2
    for layer, parts in zip(whole.layers, zip(*(r.layers for r in ranks), strict=True), strict=True):
        qs, ks, vs = zip(*(p.qkv_weight.split([q, kv, kv]) for p in parts), strict=True)
        assert torch.equal(torch.cat(qs), layer.qkv_weight[: cfg.q_size])
        for k, v in ((torch.cat(ks), torch.cat(vs)),) if cfg.num_kv_heads > 1 else zip(ks, vs, strict=True):
            assert torch.equal(k, layer.qkv_weight[cfg.q_size: cfg.q_size + cfg.kv_size])  # split, or replicated
            assert torch.equal(v, layer.qkv_weight[cfg.q_size + cfg.kv_size:])
        if cfg.qkv_bias:
            assert torch.equal(torch.cat([p.qkv_bias.split([q, kv, kv])[0] for p in parts]),
                               layer.qkv_bias[: cfg.q_size])
        assert torch.equal(torch.cat([p.o_weight for p in parts], dim=1), layer.o_weight)
        gate_up = [p.gate_up_weight.split(i) for p in parts]
        assert torch.equal(torch.cat([g for g, _ in gate_up]), layer.gate_up_weight[: cfg.intermediate_size])
        assert torch.equal(torch.cat([u for _, u in gate_up]), layer.gate_up_weight[cfg.intermediate_size:])
        assert torch.equal(torch.cat([p.down_weight for p in parts], dim=1), layer.down_weight)
        norms = {n: t for n, t in layer.named_parameters() if "norm" in n}
        assert norms and all(torch.equal(dict(p.named_parameters())[n], t) for p in parts for n, t in norms.items())
    embed = torch.cat([r.embed for r in ranks])  # [2 * ceil(vocab / 2), hidden]
    assert torch.equal(embed[: cfg.vocab_size], whole.embed) and embed[cfg.vocab_size:].abs().sum() == 0
    assert all(isinstance(r, type(whole)) for r in ranks)  # the family's own layers (Gemma's for Gemma)
    assert all((r.lm_head is r.embed) == cfg.tie_embeddings for r in ranks)


@pytest.mark.parametrize(("heads", "kv_heads", "inter", "problem"), [
    (4, 2, 96, "attention heads do not split 3 ways"),
    (6, 4, 96, "KV heads neither split 3 ways nor divide 3"),
    (6, 3, 100, "intermediate size 100 does not split 3 ways"),
])
def test_a_model_that_does_not_split_is_refused_with_the_reason(heads: int, kv_heads: int, inter: int,
                                                               problem: str) -> None:
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 48, "intermediate_size": inter,
                                 "num_hidden_layers": 1, "num_attention_heads": heads,
                                 "num_key_value_heads": kv_heads})
    with pytest.raises(ConfigError, match=problem):
        ShardPlan.of(cfg, 0, 3)


def test_kv_heads_split_or_replicate_along_the_query_heads_that_use_them() -> None:
    def kv_rows(kv_heads: int, size: int) -> list[tuple[int, int]]:
        cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64,
                                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 8,
                                     "num_key_value_heads": kv_heads})
        return [ShardPlan.of(cfg, rank, size).kv_rows() for rank in range(size)]

    assert kv_rows(8, 2) == [(0, 32), (32, 64)]  # head_dim 8: 4 KV heads each
    assert kv_rows(2, 4) == [(0, 8), (0, 8), (8, 16), (8, 16)]  # query heads 0-3 use KV head 0
    assert kv_rows(1, 2) == [(0, 8), (0, 8)]


def _cached_fraction(path: Path) -> float:
    """The part of the file's pages in the page cache (mincore over a map of it, which reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, pages = path.stat().st_size, -(-path.stat().st_size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


def test_a_rank_reads_from_disk_its_part_of_the_checkpoint_and_not_the_rest(tmp_path: Path) -> None:
    """What a rank's load brings into the page cache from a checkpoint nobody read yet: its half (rows of
    q/k/v, gate/up and the vocabulary, columns of o and down: 8 KiB of each 16 KiB row), not the whole
    file that a memory map's read-ahead around each slice would fetch."""
    folder = make_tiny_model(tmp_path, hidden_size=1024, num_heads=8, num_kv_heads=8, intermediate_size=4096,
                             vocab_size=8192)
    path = folder / "model.safetensors"
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written, now out of the cache
    os.close(fd)
    assert _cached_fraction(path) < 0.01, "this file system keeps the file in memory: nothing to measure"
    load_shard(folder, ShardPlan.of(ModelConfig.from_folder(folder), 0, 2), torch.float32, CPU, 64,
               TensorParallelGroup(0, 2, CPU))
    assert 0.45 < _cached_fraction(path) < 0.6
