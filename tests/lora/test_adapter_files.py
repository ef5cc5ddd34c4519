"""One read per load: the bytes hashed are the bytes parsed, the header is checked on them, and the
fast parse (joined byte ranges, kept plans) gives exactly what the per-tensor parse gives."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.errors import AdapterFormatError
from node.lora import adapter_files
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import adapter_weights_sha256
from node.lora.slots import LoRASlots
from tests.fixtures.adapters import make_adapter

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET = LoRATargetSpec.of(2, dict.fromkeys(MODULES, (64, 64)))  # make_adapter's shapes: hidden in and out


def _per_tensor(folder: Path) -> LoRAWeights:
    """The slow reference: every tensor on its own, through `LoRAWeights.from_modules`."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    modules, scales = {}, {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            layer, module = int(key.split(".layers.")[1].split(".")[0]), key.split(".")[-3]
            modules[(layer, module)] = (a, tensors[key.replace("lora_A", "lora_B")])
            scales[(layer, module)] = config["lora_alpha"] / a.shape[0]
    return LoRAWeights.from_modules(modules, scales)


def _same(x: LoRAWeights, y: LoRAWeights) -> bool:
    """The same A and the same scaled B (the fast parse leaves the scaling to the slot copy)."""
    xb, yb = x.scaled_b(), y.scaled_b()
    return (x.rank == y.rank and x.a.keys() == y.a.keys() and xb.keys() == yb.keys()
            and all(torch.equal(x.a[k], y.a[k]) for k in x.a) and all(torch.equal(xb[k], yb[k]) for k in xb))


def test_the_hash_of_the_bytes_read_is_the_registry_hash(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", num_layers=2, rank=4)
    files = AdapterFiles.read(tmp_path / "a")
    assert files.sha256() == adapter_weights_sha256(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert files.sha256() != adapter_weights_sha256(tmp_path / "a")  # the bytes read, not the file now


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fast_parse_equals_the_per_tensor_parse(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = tmp_path / "a"
    make_adapter(folder, num_layers=2, rank=4, modules=("q_proj", "v_proj", "down_proj"), dtype=dtype)
    for _ in range(2):  # the second load uses the kept plan
        weights = load_lora_adapter(folder, TARGET, max_rank=8)
        assert _same(weights, _per_tensor(folder))
        assert weights.a["qkv"].dtype == torch.float32
        assert torch.equal(weights.a["qkv"][:, 4:8], torch.zeros(2, 4, 64))  # k_proj rows: no LoRA


def test_mixed_ranks_take_the_per_tensor_path_with_the_same_result(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    make_adapter(folder, num_layers=2, rank=4, modules=("q_proj", "v_proj"))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, 64)
    tensors[f"{prefix}.lora_B.weight"] = torch.randn(64, 2)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())  # as peft saves a mixed rank
    config["rank_pattern"] = {"model.layers.1.self_attn.v_proj": 2}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = load_lora_adapter(folder, TARGET, max_rank=8)
    assert weights.rank == 4 and weights.ranks[(1, "v_proj")] == 2
    a, b = weights.modules[(1, "v_proj")]
    assert torch.equal(a, tensors[f"{prefix}.lora_A.weight"])
    assert torch.equal(b, tensors[f"{prefix}.lora_B.weight"] * 4.0)  # alpha 8 / its own rank 2, as peft


def _rewrite(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_gap_or_trailing_bytes_are_refused_even_with_a_header_seen_before(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    make_adapter(folder)
    weights_path = folder / "adapter_model.safetensors"
    AdapterFiles.read(folder).check()  # the good layout is now kept
    weights_path.write_bytes(weights_path.read_bytes() + b"\0" * 8)  # same header, 8 bytes more
    with pytest.raises(AdapterFormatError, match="after the last tensor"):
        AdapterFiles.read(folder).check()
    tensor = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    _rewrite(weights_path, {"t": tensor, "u": {**tensor, "data_offsets": [16, 24]}}, b"\0" * 24)
    with pytest.raises(AdapterFormatError, match="gap"):
        AdapterFiles.read(folder).check()


def test_a_reused_slot_is_cleared_beyond_the_layers_of_its_new_adapter() -> None:
    target = LoRATargetSpec.of(3, dict(TARGET.module_shapes))
    slots = LoRASlots(target, num_slots=1, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    full = LoRAWeights.from_modules({(layer, "q_proj"): (torch.ones(4, 64), torch.ones(64, 4)) for layer in range(3)})
    slots.activate("full", full, in_use=())
    first = LoRAWeights.from_modules({(0, "q_proj"): (torch.full((4, 64), 2.0), torch.full((64, 4), 2.0))})
    slot = slots.activate("first-layer-only", first, in_use=())
    assert torch.equal(slots.a[0]["qkv"][slot, :4], torch.full((4, 64), 2.0))
    assert not slots.a_all["qkv"][1:, slot].any() and not slots.b_all["qkv"][1:, slot].any()


def test_a_buffer_an_earlier_load_used_holds_none_of_its_bytes_when_reused(tmp_path: Path) -> None:
    """Loads read into buffers kept from loads before (`HostBufferPool`): the parts of the stacks the
    file does not fill (here k_proj's rows of the qkv A stack) are zeroed, not left as they were."""
    folder = tmp_path / "a"
    make_adapter(folder, num_layers=2, rank=4, modules=("q_proj", "v_proj", "down_proj"))
    expected = load_lora_adapter(folder, TARGET, max_rank=8)
    dirty, _ = adapter_files._BUFFERS.take(expected.nbytes, None, ())
    dirty.fill_(0xFF)  # NaN as float32
    address = dirty.data_ptr()
    del dirty
    gc.collect()
    weights = load_lora_adapter(AdapterFiles.open(folder), TARGET, max_rank=8)  # one preadv into that block
    assert weights.a["qkv"].data_ptr() == address
    assert torch.equal(weights.a["qkv"][:, 4:8], torch.zeros(2, 4, 64)) and _same(weights, expected)
