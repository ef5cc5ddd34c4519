"""The tree's bulk keccak gives eth_hash's digests whichever backend pycryptodome loaded its C code
with: ctypes, or cffi once cffi is installed (moto, a test dependency, brings it in through
cryptography), so installing a package never breaks settlement."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

CHECK = """
import sys
if {block_cffi}:
    sys.modules["cffi"] = None  # pycryptodome falls back to ctypes
import os
from Crypto.Util import _raw_api
from eth_hash.auto import keccak
from node.settlement.merkle import _BulkKeccak, hasher
h = _BulkKeccak()
for data in (b"", b"abc", os.urandom(4097)):
    assert h(data) == keccak(data)
assert isinstance(hasher(), _BulkKeccak)
print(_raw_api.backend)
"""

BACKENDS = ["ctypes"] + (["cffi"] if importlib.util.find_spec("cffi") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_bulk_keccak_matches_eth_hash_under_each_backend(backend: str) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK.format(block_cffi=backend == "ctypes")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == backend
