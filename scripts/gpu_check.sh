#!/usr/bin/env bash
# The device check, one script for a lent GPU machine (under 8 minutes on an H100/H200):
# the tests that exercise CUDA (Triton LoRA and paged attention kernels compiled, with their `gpu`-marked
# tests: the listed files run whole, so `-m gpu` tests in them run too, the fused LoRA kernels' among them;
# CUDA graphs, the engine on the device), test_quant.py's gpu tests (torchao on CUDA), then bench/gpu.py. Everything it prints and bench/results/gpu.json land in $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/card.txt" 2>&1
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  >>"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
# The CUDA paths: these modules pick the device when one is present. Caps: 180 + 45 + 240 s of commands
# (under 8 minutes with the card query), so one run fits a 15-minute slot with time to run it again.
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/lora/test_triton_ops.py tests/lora/test_triton_fused.py \
  tests/models/test_triton_attention.py tests/engine/test_cuda_graph.py tests/engine/test_correctness.py tests/lora/ \
  2>&1 | tee "$OUT/tests.txt" | tail -20
# Quantized decode on CUDA (torchao's int4/int8/fp8 kernels): only the file's gpu-marked tests.
timeout 45 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/models/test_quant.py 2>&1 | tee "$OUT/tests_quant.txt" \
  | tail -8
timeout 240 "$PY" bench/gpu.py 2>&1 | tee "$OUT/bench.txt" | tail -40
cp bench/results/gpu.json "$OUT/" 2>/dev/null || true
