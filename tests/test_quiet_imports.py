"""A user's terminal shows what loranode says, not the noise of the libraries under it."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_training_and_devkit_stack_prints_no_library_noise() -> None:
    # peft imports torchao, which warns about CUDA-only kernels it cannot load on this machine and
    # registers enums the way torch deprecates: two lines each that every `make demo` used to print
    done = subprocess.run([sys.executable, "-c", "import node.devkit, peft, torchao"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr


def test_the_filter_keeps_every_other_warning_of_those_libraries() -> None:
    script = ("import logging, node; logging.basicConfig(); "
              "logging.getLogger('torchao').warning('something that matters')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "something that matters" in done.stderr
