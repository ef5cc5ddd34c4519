#!/usr/bin/env bash
# The device check, one script for a lent GPU machine (under 8 minutes on an H100/H200): the tests that
# exercise CUDA (Triton LoRA and paged attention kernels compiled, with their `gpu`-marked tests: the
# listed files run whole, so `-m gpu` tests in them run too; CUDA graphs, the engine on the device),
# test_quant.py's gpu tests (torchao on CUDA), then bench/gpu.py. Everything it prints, the logs and
# bench/results/gpu.json land in $OUT (or ./gpu-out).
#
# Prepare here (network): scripts/gpu_wheels.sh (or `make gpu-wheels`) fills .whl/ with the packages the
# card's image lacks (torchao, xgrammar and its needs). Then, through the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# and, if time is left and a step needs it again: run(command="PARTS=bench bash scripts/gpu_check.sh", ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
# The carried wheels whose package the image lacks go into a folder of their own, ahead of the image's
# packages on the path (the image's versions win, but for typing_extensions, which the carried pydantic
# needs at 4.16 or newer and which only ever adds: an older one is shadowed).
SITE=/tmp/loranode-site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  missing=$("$PY" - "$WHEELS"/*.whl <<'PYEOF'
import importlib.metadata as md
import sys

from packaging.version import Version

for wheel in sys.argv[1:]:
    name, version = wheel.rsplit("/", 1)[-1].split("-")[:2]
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
        continue
    if name == "typing_extensions" and Version(installed) < Version(version):
        print(wheel)
PYEOF
)
  if [ -n "$missing" ]; then
    echo "installing from $WHEELS: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing \
      || echo "WHEEL INSTALL FAILED"
  fi
else
  echo "no wheels in $WHEELS (scripts/gpu_wheels.sh makes them; carry .whl): torchao and xgrammar may be missing"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$PY" - <<'PYEOF'
import importlib.metadata as md

for name in ("triton", "torchao", "transformers", "peft", "xgrammar", "pydantic", "flash-attn"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PYEOF
} >"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
# Only the fixture plugin the listed tests use (tests/fixtures/models.py): tests/conftest.py loads every
# plugin (chain, database, x402: web3, SQLAlchemy, ...), which the card's image has not.
TESTS=(-q -p no:cacheprovider --noconftest -p tests.fixtures.models)
# Caps: 170 + 45 + 240 s of commands, about 15 s of wheels and card query: under 8 minutes. A second run
# in the same 15-minute slot does not fit whole: PARTS picks the steps (`PARTS=bench` reruns the bench
# alone). bench/gpu.py writes gpu.json after every row and starts no round of its last row past 220 s.
PARTS="${PARTS:-tests quant bench}"
if [[ " $PARTS " == *" tests "* ]]; then
  timeout 170 "$PY" -m pytest "${TESTS[@]}" tests/lora/test_triton_ops.py tests/lora/test_triton_fused.py \
    tests/lora/test_ops.py tests/lora/test_copy_stream.py tests/models/test_triton_attention.py \
    tests/engine/test_cuda_graph.py tests/engine/test_correctness.py 2>&1 | tee "$OUT/tests.txt" | tail -20
fi
# Quantized decode on CUDA (torchao's int4/int8/fp8 kernels): only the file's gpu-marked tests.
if [[ " $PARTS " == *" quant "* ]]; then
  timeout 45 "$PY" -m pytest "${TESTS[@]}" -m gpu tests/models/test_quant.py 2>&1 | tee "$OUT/tests_quant.txt" \
    | tail -8
fi
if [[ " $PARTS " == *" bench "* ]]; then
  timeout 240 "$PY" bench/gpu.py 2>&1 | tee "$OUT/bench.txt" | tail -60
  cp bench/results/gpu.json "$OUT/" 2>/dev/null || echo "no bench/results/gpu.json"
fi
