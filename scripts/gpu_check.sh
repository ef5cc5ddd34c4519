#!/usr/bin/env bash
# The device check, one script for a lent GPU machine (under 8 minutes on an H100/H200):
# the tests that exercise CUDA (Triton LoRA and paged attention kernels compiled, with their `gpu`-marked
# tests: the listed files run whole, so `-m gpu` tests in them run too; CUDA graphs, the engine on the device),
# then bench/gpu.py. Everything it prints and bench/results/gpu.json land in $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/card.txt" 2>&1
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  >>"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
# The CUDA paths: these modules pick the device when one is present.
timeout 270 "$PY" -m pytest -q -p no:cacheprovider tests/lora/test_triton_ops.py tests/models/test_triton_attention.py \
  tests/engine/test_cuda_graph.py tests/engine/test_correctness.py tests/lora/ 2>&1 | tee "$OUT/tests.txt" | tail -20
timeout 300 "$PY" bench/gpu.py 2>&1 | tee "$OUT/bench.txt" | tail -40
cp bench/results/gpu.json "$OUT/" 2>/dev/null || true
