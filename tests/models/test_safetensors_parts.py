"""Parts of a safetensors file's tensors, read by byte ranges: the same values as safetensors' own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from node.errors import ModelFormatError
from node.models.safetensors_parts import SafetensorsParts


def test_rows_columns_and_joined_ranges_are_the_tensors_values(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(6, 10, generator=g).to(torch.bfloat16),
               "f16": torch.randn(4, 3, 2, generator=g).half(),
               "f32": torch.randn(5, generator=g), "i64": torch.arange(12).view(3, 4), "scalar": torch.tensor(7.5)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with SafetensorsParts(tmp_path / "m.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.read(name), t) and f.read(name).dtype == t.dtype
        bf16 = tensors["bf16"]
        assert torch.equal(f.read("bf16", (0, ((1, 3),))), bf16[1:3])
        assert torch.equal(f.read("bf16", (1, ((2, 7),))), bf16[:, 2:7])
        assert torch.equal(f.read("bf16", (0, ((0, 1), (4, 6)))), torch.cat([bf16[0:1], bf16[4:6]]))
        assert torch.equal(f.read("f16", (0, ((2, 4),))), tensors["f16"][2:4])
        assert torch.equal(f.read("i64", (1, ((0, 1), (3, 4)))), tensors["i64"][:, [0, 3]])


def test_a_file_that_is_not_safetensors_or_ends_early_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ModelFormatError, match="not a safetensors file"):
        SafetensorsParts(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with SafetensorsParts(tmp_path / "cut.safetensors") as f, pytest.raises(ModelFormatError, match="ends inside"):
        f.read("w")
