"""GPU decode against the memory-bandwidth bound: base only and 1..512 distinct rank-16 adapters.

One command on a CUDA machine (under 8 minutes on an H100/H200):

    python bench/gpu.py                 # Llama-3-8B shapes, bf16, random weights built on the device
    python bench/gpu.py --layers 16     # fewer layers if memory or time is short (figures are per step)
    python bench/gpu.py --cpu-smoke     # the same code path on a tiny model on the CPU (no figures)

It (a) checks the Triton LoRA kernels against the torch ops, (b) measures the card's copy bandwidth
(a large device-to-device copy, bytes read + written), (c) times decode steps through the engine's
CUDA graphs (`node.engine.cuda_graph`) for base-only and 1, 8, 64 (batch 64) and 512 (batch 512)
distinct adapters, each against base-only at the same batch. Bytes per step = base weights + the
distinct adapters' weights + the KV cache read; achieved bandwidth = bytes / step time, (d) times one
layer of paged decode attention at batch 256 with 2,048 cached tokens each (Llama-3-8B heads, block
16): our Triton kernel reading the cache in place against SDPA over the gathered cache, (e) times the
LoRA of one decode step alone (batch 64, 64 distinct rank-16 adapters, every layer and group, replayed
from a CUDA graph): today's fused kernels (one launch per group, at a few `min_programs`) against the
two-launch shrink/expand kernels. Prints the tables and writes bench/results/gpu.json. Without CUDA
(and without --cpu-smoke) it exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine.cuda_graph import DecodeBatch, DecodeGraphs
from node.lora.adapter import LoRATargetSpec
from node.lora.ops import apply_lora, uses_triton
from node.lora.slots import GROUPS, LoRASlotPools, LoRASlots
from node.models import attention
from node.models.config import ModelConfig
from node.models.llama import LlamaForCausalLM
from node.models.quant import has_int8_kernel, quantize_weights

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
RANK, BLOCK = 16, 16
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192}
TINY = {**LLAMA3_8B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Case:
    batch: int
    adapters: int  # distinct adapters in the batch (0: base only)
    int8: bool = False


def build(cfg: ModelConfig, num_slots: int, num_blocks: int, max_len: int, device: torch.device,
          ) -> tuple[LlamaForCausalLM, list[tuple[torch.Tensor, torch.Tensor]], LoRASlots]:
    """A random bf16 model, KV cache and adapter slots, made on the device (no files)."""
    dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg, dtype, max_len)
    for name, p in model.named_parameters():
        p.data.fill_(1.0) if "norm" in name else p.data.normal_(0.0, 0.02)
    shape = (num_blocks + 1, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
          for _ in range(cfg.num_layers)]
    slots = LoRASlots(LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes()), num_slots, RANK, dtype, device)
    for layer in range(cfg.num_layers):
        for group in GROUPS:
            slots.a[layer][group].normal_(0.0, cfg.hidden_size ** -0.5)
            slots.b_group[layer][group].normal_(0.0, 0.02)
    slots.ranks.fill_(RANK)
    return model.eval(), kv, slots


def check_kernels(slots: LoRASlots, device: torch.device) -> dict[str, float]:
    """Triton (on CUDA) against the torch ops, both forms, mixed ranks, on layer 0 of the real slots."""
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
            apply_lora(x, out, slots.a[0][group], slots.b_group[0][group], slots.widths[group], ranks, plan)
            bs = list(b.float().split(list(slots.widths[group]), dim=1))
            (_gather if form == "gather" else _segment)(x.float(), ref, a.float(), bs,
                                                        plan if form == "gather" else plan.runs, RANK)
            errors[f"{group}/{form}"] = ((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    return errors


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 5)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batch(case: Case, ctx: int, max_blocks: int) -> DecodeBatch:
    """`batch` sequences of `ctx` cached tokens, decoding one each; adapters round-robin, ordered by slot."""
    slots = sorted(i % case.adapters for i in range(case.batch)) if case.adapters else [-1] * case.batch
    tables = [list(range(i * max_blocks, (i + 1) * max_blocks)) for i in range(case.batch)]
    return DecodeBatch(token_ids=[(7 * i) % 200 for i in range(case.batch)], positions=[ctx - 1] * case.batch,
                       kv_indices=[t[(ctx - 1) // BLOCK] * BLOCK + (ctx - 1) % BLOCK for t in tables],
                       block_tables=tables, context_lens=[ctx] * case.batch, token_slots=slots)


def time_steps(model: LlamaForCausalLM, graphs: DecodeGraphs, batch: DecodeBatch, steps: int,
               device: torch.device) -> float:
    """Seconds per decode step: graph replay + LM head + greedy pick, as the engine runs it."""
    for _ in range(2):  # the first run of a bucket captures its graph
        model.logits(graphs.run(batch)).argmax(-1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.logits(graphs.run(batch)).argmax(-1)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def step_bytes(model: LlamaForCausalLM, slots: LoRASlots, case: Case, ctx: int) -> int:
    """Bytes a decode step must read: base weights (not the embedding table), distinct adapters, KV cache."""
    cfg = model.cfg
    base = sum(b.numel() * b.element_size() for n, b in [*model.named_parameters(), *model.named_buffers()]
               if n != "embed" and not n.startswith("rotary"))
    per_adapter = LoRASlots.slot_nbytes(slots_target(cfg), RANK, torch.bfloat16)
    kv = case.batch * ctx * 2 * cfg.num_layers * cfg.kv_size * 2
    return base + case.adapters * per_adapter + kv


def slots_target(cfg: ModelConfig) -> LoRATargetSpec:
    return LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())


def run_cases(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
              ) -> tuple[list[dict], dict, dict]:
    cases = [Case(args.batch, a) for a in (0, 1, 8, 64) if a <= args.batch]
    cases += [Case(args.big_batch, 0), Case(args.big_batch, args.big_batch)]
    max_len = args.ctx + 16
    max_blocks = -(-max_len // BLOCK)
    num_blocks = args.big_batch * max_blocks
    model, kv, slots = build(cfg, max(args.big_batch, 64), num_blocks, max_len, device)
    errors = check_kernels(slots, device) if uses_triton(device) else {}
    lora = lora_row(slots, device, args.batch, args.steps, args.rounds) if uses_triton(device) or args.cpu_smoke \
        else {}
    pools = LoRASlotPools([slots])
    graphs = DecodeGraphs(model, kv, pools, max_batch=args.big_batch, max_blocks=max_blocks, block_size=BLOCK,
                          scratch_kv_index=num_blocks * BLOCK, use_graphs=device.type == "cuda")
    best: dict[Case, float] = {}
    for _ in range(args.rounds):  # interleaved rounds, best of each
        for case in cases:
            t = time_steps(model, graphs, decode_batch(case, args.ctx, max_blocks), args.steps, device)
            best[case] = min(best.get(case, t), t)
    nbytes = {case: step_bytes(model, slots, case, args.ctx) for case in cases}  # bf16, before int8
    if args.int8:
        quantize_weights(model, "int8")
        graphs = DecodeGraphs(model, kv, pools, max_batch=args.big_batch, max_blocks=max_blocks, block_size=BLOCK,
                              scratch_kv_index=num_blocks * BLOCK, use_graphs=device.type == "cuda")
        for a in (0, 64):
            case = Case(args.batch, min(a, args.batch), int8=True)
            best[case] = time_steps(model, graphs, decode_batch(case, args.ctx, max_blocks), args.steps, device)
    rows = []
    for case, t in best.items():
        base = best[Case(case.batch, 0, case.int8)]
        rows.append({"batch": case.batch, "adapters": case.adapters, "int8": case.int8, "step_ms": t * 1e3,
                     "tokens_per_s": case.batch / t, "cost_vs_base": t / base - 1,
                     "bytes_per_step": nbytes.get(case)})
    return rows, errors, lora


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
    best: dict[str, float] = {}
    for _ in range(rounds):  # interleaved, best of each
        for name, fn in paths.items():
            fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            synchronize(device)
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / steps)
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
        return _graphed(step, device)

    paths = {"two_launch": path(triton_ops.lora_gather), "fused": path(triton_fused.lora_gather_fused)}
    for min_programs in (128, 512, 1024):
        paths[f"fused_p{min_programs}"] = path(triton_fused.lora_gather_fused, min_programs=min_programs)
    best = _best_times(paths, device, steps, rounds)
    nbytes = min(batch, slots.num_slots) * slots.slot_bytes
    return {"batch": batch, "adapters": min(batch, slots.num_slots), "layers": num_layers, "lora_bytes": nbytes,
            **{f"{name}_ms": t * 1e3 for name, t in best.items()},
            "speedup": best["two_launch"] / best["fused"], "fused_default_min_programs": triton_fused.MIN_PROGRAMS}


def _graphed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
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


def _best_times(paths: dict[str, Callable[[], None]], device: torch.device, steps: int, rounds: int,
                ) -> dict[str, float]:
    """Seconds per call of each path: interleaved rounds, best of each."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks it runs")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--big-batch", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=128, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # our attention kernel in Triton's interpreter
        device, raw = torch.device("cpu"), {**TINY}
        args.batch, args.big_batch, args.steps, args.rounds, args.ctx = 8, 16, 2, 1, 20
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (none found); `--cpu-smoke` runs its code path on a tiny CPU model.")
        sys.exit(2)
    else:
        device, raw = torch.device("cuda"), {**LLAMA3_8B, "num_hidden_layers": args.layers}
    cfg = ModelConfig.from_dict(raw)
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, 64 << 20 if args.cpu_smoke else 4 << 30)
    rows, errors, lora = run_cases(args, cfg, device)
    attn = attention_row(device, *((4, 40) if args.cpu_smoke else (256, 2048)), cfg, args.steps, args.rounds)
    report(args, cfg, device, bandwidth, rows, errors, attn, lora, time.perf_counter() - started)


def report(args: argparse.Namespace, cfg: ModelConfig, device: torch.device, bandwidth: float, rows: list[dict],
           errors: dict[str, float], attn: dict, lora: dict, seconds: float) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run: figures mean nothing)"
    print(f"device: {name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); "
          f"model: Llama-3-8B shapes, {cfg.num_layers} layers, bf16; rank {RANK}; ctx {args.ctx}")
    if errors:
        print("kernel check (max |triton - torch fp32| / max |torch|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"int8 fused kernel on this device: {has_int8_kernel(device.type, torch.bfloat16)}")
    print(f"{'batch':>5} {'adapters':>8} {'weights':>7} {'step ms':>8} {'tok/s':>9} {'GB/step':>8} "
          f"{'TB/s':>6} {'of copy':>7} {'LoRA cost':>9} {'bytes +':>7}")
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["adapters"] == 0 and not b["int8"])
        nbytes = r["bytes_per_step"]
        achieved = nbytes / (r["step_ms"] / 1e3) if nbytes else None
        r["achieved_bytes_per_s"] = achieved
        r["fraction_of_copy_bandwidth"] = achieved / bandwidth if achieved else None
        r["bytes_vs_base"] = nbytes / base["bytes_per_step"] - 1 if nbytes else None
        print(f"{r['batch']:>5} {r['adapters']:>8} {'int8' if r['int8'] else 'bf16':>7} {r['step_ms']:>8.2f} "
              f"{r['tokens_per_s']:>9.0f} {(nbytes or 0) / 1e9:>8.2f} {(achieved or 0) / 1e12:>6.2f} "
              f"{r['fraction_of_copy_bandwidth'] or 0:>7.0%} {r['cost_vs_base']:>+9.1%} "
              f"{r['bytes_vs_base'] or 0:>+7.1%}")
    attn["ours_fraction_of_copy_bandwidth"] = attn["kv_bytes"] / (attn["ours_ms"] / 1e3) / bandwidth
    print(f"paged decode attention, one layer, batch {attn['batch']} x {attn['ctx']} cached tokens (block "
          f"{attn['block_size']}): ours {attn['ours_ms']:.3f} ms ({attn['ours_fraction_of_copy_bandwidth']:.0%} of "
          f"copy), gather + SDPA {attn['gather_ms']:.3f} ms: {attn['speedup']:.1f}x; max |ours - gather| "
          f"{attn['max_abs_error']:.1e}")
    if lora:
        lora["fused_fraction_of_copy_bandwidth"] = lora["lora_bytes"] / (lora["fused_ms"] / 1e3) / bandwidth
        sweep = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in lora.items() if k.startswith("fused_p"))
        print(f"LoRA alone, batch {lora['batch']} x {lora['adapters']} distinct rank-{RANK} adapters, {lora['layers']} "
              f"layers x 4 groups (graph): fused {lora['fused_ms']:.3f} ms "
              f"({lora['fused_fraction_of_copy_bandwidth']:.0%} of copy), two launches {lora['two_launch_ms']:.3f} ms: "
              f"{lora['speedup']:.2f}x; fused by min_programs (ms): {sweep}")
    print(f"total {seconds:.0f} s")
    if args.cpu_smoke:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"device": name, "copy_bandwidth_bytes_per_s": bandwidth, "layers": cfg.num_layers,
                                   "rank": RANK, "ctx": args.ctx, "kernel_check": errors, "rows": rows,
                                   "paged_attention": attn, "lora_launches": lora,
                                   "seconds": seconds}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
