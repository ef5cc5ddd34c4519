"""GPU decode against the memory-bandwidth bound: base only and 1..512 distinct rank-16 adapters.

One command on a CUDA machine (under 8 minutes on an H100/H200; scripts/gpu_check.sh runs it):

    python bench/gpu.py                 # Llama-3-8B shapes, bf16, random weights built on the device
    python bench/gpu.py --layers 16     # fewer layers if memory or time is short (figures are per step)
    python bench/gpu.py --cpu-smoke     # every row on a tiny model on the CPU, Triton in its interpreter
                                        # (checks each row runs; its figures mean nothing)

It (a) checks the fused Triton LoRA kernels against the torch ops, (b) measures the card's copy
bandwidth (a large device-to-device copy, bytes read + written), (c) times decode steps through the
engine's CUDA graphs (`node.engine.cuda_graph`) for base-only at batch 1 and 64 and 1, 8, 64 (batch
64) and 512 (batch 512) distinct adapters, each against base-only at the same batch. Bytes per step =
base weights + the distinct adapters' weights + the KV cache read; achieved bandwidth = bytes / step
time, (d) quantized bases (torchao: int8 and int4 weight-only, fp8 where the card has it, else the
reason it is refused) against bf16 at batch 1 and 64, base only and with 64 distinct adapters on
top, all four weight formats in the same interleaved rounds, (e) times one layer of paged decode
attention at batch 256 with 2,048 cached tokens each (Llama-3-8B heads, block 16): our Triton kernel
reading the cache in place against SDPA over the gathered cache, (f) times the LoRA of one decode
step alone (batch 64, 64 distinct rank-16 adapters, every layer and group, replayed from a CUDA
graph): today's fused kernels (one launch per group, at a few `min_programs`) against the two-launch
shrink/expand kernels, (g) the engine against transformers + peft mixed-adapter `generate` on the
same card: the same 64 requests (64 prompt + 64 new tokens, greedy), each on its own of 64 random
rank-16 adapters (bench/engine.py's systems, in bf16). A row that fails on the card prints its error
and the others still run (the smoke run stops at the first). Prints the tables and writes
bench/results/gpu.json. Without CUDA (and without --cpu-smoke) it exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # Triton reads it as it builds each kernel: before anything imports one
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import against_peft
from bench.gpu_kernels import BLOCK, RANK, attention_row, check_kernels, lora_row, synchronize
from node.engine.cuda_graph import DecodeBatch, DecodeGraphs
from node.errors import ConfigError
from node.lora.adapter import LoRATargetSpec
from node.lora.slots import GROUPS, LoRASlotPools, LoRASlots
from node.models.config import ModelConfig
from node.models.llama import LlamaForCausalLM
from node.models.quant import check_scheme, quantize_weights, tensor_nbytes

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
QUANT_SCHEMES = ("int8", "int4", "fp8")
# the engine-vs-peft row's model (Llama-shaped, vocab 8,000): big enough that the card does some work
PEFT_MODEL = {"hidden_size": 1024, "num_layers": 16, "num_heads": 16, "num_kv_heads": 8}
PEFT_SMOKE_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192}
TINY = {**LLAMA3_8B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Case:
    batch: int
    adapters: int  # distinct adapters in the batch (0: base only)


def build(cfg: ModelConfig, num_slots: int, num_blocks: int, max_len: int, device: torch.device,
          ) -> tuple[LlamaForCausalLM, list[tuple[torch.Tensor, torch.Tensor]], LoRASlots]:
    """A random bf16 model, KV cache and adapter slots, made on the device (no files)."""
    dtype = torch.bfloat16
    model = build_model(cfg, max_len, device)
    shape = (num_blocks + 1, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
          for _ in range(cfg.num_layers)]
    slots = LoRASlots(slots_target(cfg), num_slots, RANK, dtype, device)
    for layer in range(cfg.num_layers):
        for group in GROUPS:
            slots.a[layer][group].normal_(0.0, cfg.hidden_size ** -0.5)
            slots.b_group[layer][group].normal_(0.0, 0.02)
    slots.ranks.fill_(RANK)
    return model, kv, slots


def build_model(cfg: ModelConfig, max_len: int, device: torch.device) -> LlamaForCausalLM:
    """A random bf16 model on the device: norms 1, every other weight N(0, 0.02)."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg, torch.bfloat16, max_len)
    for name, p in model.named_parameters():
        p.data.fill_(1.0) if "norm" in name else p.data.normal_(0.0, 0.02)
    return model.eval()


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


def step_bytes(model: LlamaForCausalLM, case: Case, ctx: int) -> int:
    """Bytes a decode step must read: base weights as stored (not the embedding table), the distinct
    adapters, the KV cache."""
    cfg = model.cfg
    base = sum(tensor_nbytes(b) for n, b in [*model.named_parameters(), *model.named_buffers()]
               if n != "embed" and not n.startswith("rotary"))
    per_adapter = LoRASlots.slot_nbytes(slots_target(cfg), RANK, torch.bfloat16)
    kv = case.batch * ctx * 2 * cfg.num_layers * cfg.kv_size * 2
    return base + case.adapters * per_adapter + kv


def slots_target(cfg: ModelConfig) -> LoRATargetSpec:
    return LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())


def run_cases(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
              ) -> tuple[list[dict], dict, dict]:
    """The bf16 rows, the kernel check and the LoRA-alone row (they share the 512 slots)."""
    cases = [Case(1, 0)] + [Case(args.batch, a) for a in (0, 1, 8, 64) if a <= args.batch]
    cases += [Case(args.big_batch, 0), Case(args.big_batch, args.big_batch)]
    max_len = args.ctx + 16
    max_blocks = -(-max_len // BLOCK)
    num_blocks = args.big_batch * max_blocks
    model, kv, slots = build(cfg, max(args.big_batch, 64), num_blocks, max_len, device)
    errors = guarded("kernel check", lambda: check_kernels(slots, device), args.cpu_smoke)
    lora = guarded("LoRA alone", lambda: lora_row(slots, device, args.batch, args.steps, args.rounds),
                   args.cpu_smoke)
    graphs = DecodeGraphs(model, kv, LoRASlotPools([slots]), max_batch=args.big_batch, max_blocks=max_blocks,
                          block_size=BLOCK, scratch_kv_index=num_blocks * BLOCK, use_graphs=device.type == "cuda")
    best: dict[Case, float] = {}
    for _ in range(args.rounds):  # interleaved rounds, best of each
        for case in cases:
            t = time_steps(model, graphs, decode_batch(case, args.ctx, max_blocks), args.steps, device)
            best[case] = min(best.get(case, t), t)
    rows = []
    for case, t in best.items():
        base = best[Case(case.batch, 0)]
        # "int8": false keeps bench/cost.py and tests/test_cost.py reading older files (quantized rows: `quantized`)
        rows.append({"batch": case.batch, "adapters": case.adapters, "int8": False, "step_ms": t * 1e3,
                     "tokens_per_s": case.batch / t, "cost_vs_base": t / base - 1,
                     "bytes_per_step": step_bytes(model, case, args.ctx)})
    return rows, errors, lora


def quantized_rows(args: argparse.Namespace, cfg: ModelConfig, device: torch.device) -> dict:
    """bf16 and each quantized base this device runs, in the same interleaved rounds: batch 1 and
    `args.batch` base only, and `args.batch` with as many distinct adapters (LoRA in bf16 on top).
    Its own 64 slots and KV cache (the 512-slot pool of `run_cases` is freed first: on an H100 the
    four bases and that pool do not fit together)."""
    batch, max_len = args.batch, args.ctx + 16
    max_blocks = -(-max_len // BLOCK)
    num_blocks = batch * max_blocks
    model, kv, slots = build(cfg, batch, num_blocks, max_len, device)
    models, refused = {"bf16": model}, {}
    for scheme in QUANT_SCHEMES:
        try:
            check_scheme(scheme, device, torch.bfloat16)
        except ConfigError as e:
            refused[scheme] = str(e)
            continue
        quantized = guarded(f"{scheme} weights", lambda s=scheme: quantize(build_model(cfg, max_len, device), s),
                            args.cpu_smoke)
        if quantized is not None:
            models[scheme] = quantized
    pools = LoRASlotPools([slots])
    graphs = {w: DecodeGraphs(m, kv, pools, max_batch=batch, max_blocks=max_blocks, block_size=BLOCK,
                              scratch_kv_index=num_blocks * BLOCK, use_graphs=device.type == "cuda")
              for w, m in models.items()}
    cases = [Case(1, 0), Case(batch, 0), Case(batch, batch)]
    best: dict[tuple[str, Case], float] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):  # interleaved rounds across the weight formats, best of each
        for weights, g in graphs.items():
            for case in cases:
                if weights in failed:
                    continue
                t = guarded(f"{weights} batch {case.batch} x {case.adapters} adapters",
                            lambda: time_steps(models[weights], g, decode_batch(case, args.ctx, max_blocks),  # noqa: B023
                                               args.steps, device), args.cpu_smoke)
                if t is None:
                    failed[weights] = f"batch {case.batch}, {case.adapters} adapters: see the log"
                else:
                    best[weights, case] = min(best.get((weights, case), t), t)
    rows = [{"weights": w, "batch": case.batch, "adapters": case.adapters, "step_ms": t * 1e3,
             "tokens_per_s": case.batch / t, "bytes_per_step": step_bytes(models[w], case, args.ctx),
             "vs_bf16": t / best["bf16", case] if ("bf16", case) in best else None}
            for (w, case), t in best.items()]
    return {"rows": rows, "refused": refused, "failed": failed}


def quantize(model: LlamaForCausalLM, scheme: str) -> LlamaForCausalLM:
    quantize_weights(model, scheme)
    return model


def guarded(name: str, row: Callable[[], object], strict: bool) -> object:
    """`row()`, or None with the error printed when it fails and not `strict` (on the card one broken
    row must not cost the others; the CPU smoke run stops at it)."""
    try:
        return row()
    except Exception:
        if strict:
            raise
        print(f"ROW FAILED: {name}\n{traceback.format_exc()}", flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on a tiny model on the CPU: checks it runs")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--big-batch", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=128, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quant", dest="quant", action="store_false", help="skip the quantized bases")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip the engine-vs-peft row")
    parser.add_argument("--budget-s", type=float, default=220.0,
                        help="the engine-vs-peft row (last) runs no further round past this many seconds")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, raw = torch.device("cpu"), {**TINY}
        args.batch, args.big_batch, args.steps, args.rounds, args.ctx = 4, 8, 1, 1, 20
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (none found); `--cpu-smoke` runs its code path on a tiny CPU model.")
        sys.exit(2)
    else:
        device, raw = torch.device("cuda"), {**LLAMA3_8B, "num_hidden_layers": args.layers}
    cfg = ModelConfig.from_dict(raw)
    started = time.perf_counter()
    results = Results(device=torch.cuda.get_device_name(device) if device.type == "cuda" else SMOKE_DEVICE,
                      bandwidth=copy_bandwidth(device, 64 << 20 if args.cpu_smoke else 4 << 30))
    bf16 = guarded("bf16 rows", lambda: run_cases(args, cfg, device), args.cpu_smoke)
    if bf16 is not None:
        results.rows, results.kernel_check, results.lora = bf16
    free(device)  # the 512 slots and their graphs
    save(args, cfg, results, started)
    if args.quant:
        results.quantized = guarded("quantized bases", lambda: quantized_rows(args, cfg, device), args.cpu_smoke)
        free(device)
        save(args, cfg, results, started)
    results.attn = guarded("paged attention", lambda: attention_row(
        device, *((4, 40) if args.cpu_smoke else (256, 2048)), cfg, args.steps, args.rounds), args.cpu_smoke)
    free(device)
    save(args, cfg, results, started)
    if args.peft:
        results.peft = guarded("engine vs peft", lambda: against_peft(
            device.type, 4 if args.cpu_smoke else 64, PEFT_SMOKE_MODEL if args.cpu_smoke else PEFT_MODEL,
            1 if args.cpu_smoke else 2, started + args.budget_s), args.cpu_smoke)
    report(args, cfg, results, time.perf_counter() - started)
    save(args, cfg, results, started, complete=True)


SMOKE_DEVICE = "cpu (smoke run: figures mean nothing)"


def free(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back between rows (each row builds its own tensors)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Results:
    """What the rows measured; a row that failed on the card stays None (its error is in the log)."""
    device: str
    bandwidth: float
    rows: list[dict] | None = None
    kernel_check: dict | None = None
    lora: dict | None = None
    quantized: dict | None = None
    attn: dict | None = None
    peft: dict | None = None


def save(args: argparse.Namespace, cfg: ModelConfig, results: Results, started: float,
         complete: bool = False) -> None:
    """bench/results/gpu.json after every row (a run cut short by its time cap keeps what it measured);
    not on the smoke run."""
    if args.cpu_smoke:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "device": results.device, "complete": complete, "copy_bandwidth_bytes_per_s": results.bandwidth,
        "layers": cfg.num_layers, "rank": RANK, "ctx": args.ctx, "kernel_check": results.kernel_check,
        "rows": results.rows, "quantized": results.quantized, "paged_attention": results.attn,
        "lora_launches": results.lora, "engine_vs_peft": results.peft,
        "seconds": time.perf_counter() - started}, indent=2) + "\n")
    if complete:
        print(f"wrote {RESULTS}")


def report(args: argparse.Namespace, cfg: ModelConfig, results: Results, seconds: float) -> None:
    """Print every row (each line names the card) and add the derived figures to the results."""
    name, bandwidth = results.device, results.bandwidth
    card = f"[{name}]"
    print(f"device: {name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); "
          f"model: Llama-3-8B shapes, {cfg.num_layers} layers, bf16; rank {RANK}; ctx {args.ctx}")
    if results.kernel_check:
        print(f"{card} kernel check (max |triton - torch fp32| / max |torch|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in results.kernel_check.items()))
    print(f"{card} {'batch':>5} {'adapters':>8} {'step ms':>8} {'tok/s':>9} {'GB/step':>8} "
          f"{'TB/s':>6} {'of copy':>7} {'LoRA cost':>9} {'bytes +':>7}")
    rows = results.rows or []
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["adapters"] == 0)
        nbytes = r["bytes_per_step"]
        r["achieved_bytes_per_s"] = nbytes / (r["step_ms"] / 1e3)
        r["fraction_of_copy_bandwidth"] = r["achieved_bytes_per_s"] / bandwidth
        r["bytes_vs_base"] = nbytes / base["bytes_per_step"] - 1
        print(f"{card} {r['batch']:>5} {r['adapters']:>8} {r['step_ms']:>8.2f} {r['tokens_per_s']:>9.0f} "
              f"{nbytes / 1e9:>8.2f} {r['achieved_bytes_per_s'] / 1e12:>6.2f} {r['fraction_of_copy_bandwidth']:>7.0%} "
              f"{r['cost_vs_base']:>+9.1%} {r['bytes_vs_base']:>+7.1%}")
    if results.quantized:
        q = results.quantized
        print(f"{card} quantized bases (LoRA in bf16 on top), step ms and x bf16 at the same batch and adapters:")
        for r in q["rows"]:
            r["fraction_of_copy_bandwidth"] = r["bytes_per_step"] / (r["step_ms"] / 1e3) / bandwidth
            faster = "" if r["weights"] == "bf16" or r["vs_bf16"] is None else \
                ("  faster than bf16" if r["vs_bf16"] < 1 else "  NOT faster than bf16")
            print(f"{card} {r['weights']:>5} batch {r['batch']:>4} adapters {r['adapters']:>3}: {r['step_ms']:8.2f} ms "
                  f"{r['tokens_per_s']:>9.0f} tok/s {r['bytes_per_step'] / 1e9:6.2f} GB/step "
                  f"{r['fraction_of_copy_bandwidth']:>4.0%} of copy, x{r['vs_bf16'] or 0:.2f} bf16{faster}")
        for scheme, reason in {**q["refused"], **q["failed"]}.items():
            print(f"{card} {scheme}: not run: {reason}")
    if results.attn:
        attn = results.attn
        attn["ours_fraction_of_copy_bandwidth"] = attn["kv_bytes"] / (attn["ours_ms"] / 1e3) / bandwidth
        print(f"{card} paged decode attention, one layer, batch {attn['batch']} x {attn['ctx']} cached tokens (block "
              f"{attn['block_size']}): ours {attn['ours_ms']:.3f} ms ({attn['ours_fraction_of_copy_bandwidth']:.0%} "
              f"of copy), gather + SDPA {attn['gather_ms']:.3f} ms: {attn['speedup']:.1f}x; max |ours - gather| "
              f"{attn['max_abs_error']:.1e}")
    if results.lora:
        lora = results.lora
        lora["fused_fraction_of_copy_bandwidth"] = lora["lora_bytes"] / (lora["fused_ms"] / 1e3) / bandwidth
        sweep = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in lora.items() if k.startswith("fused_p"))
        print(f"{card} LoRA alone, batch {lora['batch']} x {lora['adapters']} distinct rank-{RANK} adapters, "
              f"{lora['layers']} layers x 4 groups (graph): fused {lora['fused_ms']:.3f} ms "
              f"({lora['fused_fraction_of_copy_bandwidth']:.0%} of copy), two launches {lora['two_launch_ms']:.3f} "
              f"ms: {lora['speedup']:.2f}x; fused by min_programs (ms): {sweep}")
    if results.peft:
        p = results.peft
        print(f"{card} engine vs transformers + peft mixed-adapter generate, {p['requests']} requests on "
              f"{p['adapters']} adapters ({p['prompt_tokens']} + {p['new_tokens']} tokens, bf16): loranode "
              f"{p['loranode_tokens_per_s']:.0f} tok/s, peft {p['peft_tokens_per_s']:.0f} tok/s: "
              f"{p['speedup']:.1f}x (target 10x: {'met' if p['speedup'] >= 10 else 'NOT met'})")
    print(f"total {seconds:.0f} s")


if __name__ == "__main__":
    main()
