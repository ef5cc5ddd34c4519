#!/usr/bin/env bash
# The Python packages scripts/gpu_check.sh needs that a lent GPU machine's image may lack (it has no
# network), downloaded here as wheels for its Python (CPython 3.12, x86-64 Linux) into .whl/ (ignored
# by git). The device tool carries the folder: run(..., carry=[".whl"]); gpu_check.sh installs the
# wheels whose package is missing there, the image's own versions winning.
#   torchao: quantized bases (node/models/quant.py); absent from the image.
#   xgrammar (+ apache-tvm-ffi, pydantic, pydantic-core, annotated-types, typing-inspection): the
#     engine imports it (node/engine/grammar.py); absent from the image.
#   typing-extensions: pydantic 2.14 needs 4.16 or newer (installed there only over an older one).
#   peft, transformers: the engine-vs-peft row and the reference tests; the image has both (carried
#     in case a later image drops them).
# Versions: the ones this project's venv runs (pyproject.toml pins torchao).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
PACKAGES=(torchao==0.18.0 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5
          annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 peft==0.21.2
          transformers==5.25.0)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"
du -sh "$DEST"
