"""bench/gpu.py's kernel rows: the fused LoRA kernels checked against the torch ops, one layer of
paged decode attention (ours in place vs SDPA over the gathered cache) and the LoRA of one decode step
alone (fused vs two-launch kernels); and the timing they share (interleaved rounds, best of each)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from node.lora.ops import apply_lora_triton
from node.lora.slots import GROUPS, LoRASlots
from node.models import attention
from node.models.config import ModelConfig

RANK, BLOCK = 16, 16


def check_kernels(slots: LoRASlots, device: torch.device) -> dict[str, float]:
    """The fused Triton kernels (compiled on CUDA, interpreted on the CPU smoke run) against the torch
    ops in fp32, both forms, mixed ranks, on layer 0 of the real slots."""
    from node.lora.mapping import build_plan
    from node.lora.ops import _gather, _segment  # the torch paths, called directly as the reference

    errors: dict[str, float] = {}
    ranks = slots.ranks.clone()
    ranks[1::3] = RANK // 2  # mixed ranks: the padded half of those slots must be skipped
    padded = {g: (slots.a[0][g].clone(), slots.b_group[0][g].clone()) for g in GROUPS}
    token_slots = sorted([-1, 0, 0, 1, 4, 4, 4, 7, -1, 2, 1, 1][: 12] * 3)
    for group, (a, b) in padded.items():
        num = len(GROUPS[group])
        for s in range(1, a.shape[0], 3):  # the reference sees zeros where the kernels must not read
            a.view(a.shape[0], num, RANK, -1)[s, :, RANK // 2:] = 0
            b[s, :, RANK // 2:] = 0
        x = torch.randn(len(token_slots), a.shape[2], dtype=a.dtype, device=device)
        for form in ("gather", "segment"):
            plan = build_plan(token_slots, device, form)  # type: ignore[arg-type]
            assert plan is not None
            out = torch.zeros(len(token_slots), b.shape[1], dtype=a.dtype, device=device)
            ref = out.float().clone()
            apply_lora_triton(x, out, slots.a[0][group], slots.b_group[0][group], slots.widths[group], ranks, plan)
            bs = list(b.float().split(list(slots.widths[group]), dim=1))
            (_gather if form == "gather" else _segment)(x.float(), ref, a.float(), bs,
                                                        plan if form == "gather" else plan.runs, RANK)
            errors[f"{group}/{form}"] = ((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    return errors


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_row(device: torch.device, batch: int, ctx: int, cfg: ModelConfig, steps: int, rounds: int,
                  ) -> dict:
    """One layer's decode attention over `batch` x `ctx` cached tokens: ours (in place) vs the gather path."""
    from node.models.triton_attention import paged_decode

    heads, kv_heads, dim, blocks = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, -(-ctx // BLOCK)
    kv = [torch.randn(batch * blocks, BLOCK, kv_heads, dim, dtype=torch.bfloat16, device=device) for _ in range(2)]
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks)  # scattered blocks
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=device)
    group, scale = attention.dense_decode_group(tables, lens, BLOCK), dim ** -0.5

    def gather() -> torch.Tensor:
        kg, vg = (attention._gather(c, group).transpose(1, 2) for c in kv)  # [B, KVH, K, D]
        out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kg, vg, attn_mask=group.mask,
                                                               scale=scale, enable_gqa=True)  # [B, H, 1, D]
        return out.flatten(1)

    paths = {"gather": gather, "ours": lambda: paged_decode(q, kv[0], kv[1], tables, lens, scale)}
    error = (paths["ours"]().float() - paths["gather"]().float()).abs().max().item()
    best = best_times(paths, device, steps, rounds)
    kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
    return {"batch": batch, "ctx": ctx, "block_size": BLOCK, "kv_bytes": kv_bytes, "max_abs_error": error,
            **{f"{name}_ms": t * 1e3 for name, t in best.items()}, "speedup": best["gather"] / best["ours"]}


def lora_row(slots: LoRASlots, device: torch.device, batch: int, steps: int, rounds: int) -> dict:
    """The LoRA part of a decode step: `batch` tokens on `batch` distinct slots, every layer's four groups,
    one graph per path (eager on the CPU smoke run). Bytes = the distinct adapters' weights."""
    from node.lora import triton_fused, triton_ops

    num_layers = len(slots.a)
    ranks = slots.ranks
    token_slots = torch.arange(batch, dtype=torch.int32, device=device) % slots.num_slots
    xs = {g: torch.randn(batch, slots.a[0][g].shape[2], dtype=torch.bfloat16, device=device) for g in GROUPS}
    outs = {g: torch.zeros(batch, slots.b_group[0][g].shape[1], dtype=torch.bfloat16, device=device) for g in GROUPS}

    def path(kernel: Callable[..., None], **options: int) -> Callable[[], None]:
        def step() -> None:
            for layer in range(num_layers):
                for g in GROUPS:
                    kernel(xs[g], outs[g], slots.a[layer][g], slots.b_group[layer][g], slots.widths[g], ranks,
                           token_slots, **options)
        return graphed(step, device)

    paths = {"two_launch": path(triton_ops.lora_gather), "fused": path(triton_fused.lora_gather_fused)}
    for min_programs in (128, 512, 1024):
        paths[f"fused_p{min_programs}"] = path(triton_fused.lora_gather_fused, min_programs=min_programs)
    best = best_times(paths, device, steps, rounds)
    nbytes = min(batch, slots.num_slots) * slots.slot_bytes
    return {"batch": batch, "adapters": min(batch, slots.num_slots), "layers": num_layers, "lora_bytes": nbytes,
            **{f"{name}_ms": t * 1e3 for name, t in best.items()},
            "speedup": best["two_launch"] / best["fused"], "fused_default_min_programs": triton_fused.MIN_PROGRAMS}


def graphed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`step` replayed from a CUDA graph (compiled and warmed first), or `step` itself off CUDA."""
    if device.type != "cuda":
        return step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def best_times(paths: dict[str, Callable[[], object]], device: torch.device, steps: int, rounds: int,
                ) -> dict[str, float]:
    """Seconds per call of each path: interleaved rounds (a warm-up call, then `steps` timed), best of each."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in paths.items():
            fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            synchronize(device)
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / steps)
    return best
