"""Weight-only int8 and int4 on torchao against the unquantized model (and under a LoRA adapter); fp8's
refusal off Hopper. Accuracy figures are what `bench/quant.py` prints; see node/models/quant_accuracy.py
for why agreement is counted where the reference's choice is clear."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from node.devkit import make_tiny_model
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from node.errors import ConfigError
from node.models.quant import Int4CPUWeight, linear, quantize_tensor, quantize_weights, tensor_nbytes, weight_nbytes
from node.models.quant_accuracy import Agreement
from tests.fixtures.models import TinyAdapters

ADAPTER = "sea-r8"


def _prompts(n: int = 64, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def _first_logits(engine: LLMEngine, adapter: str | None) -> torch.Tensor:
    """[prompts, vocab]: the next-token logits after each prompt, in prompt order."""
    rows: dict[tuple[int, ...], torch.Tensor] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(tuple(seq.prompt_token_ids), row.clone())

    engine.runner.logits_observer = observe
    prompts = _prompts()
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),  # type: ignore[arg-type]
                    adapter_ids=[adapter] * len(prompts))
    return torch.stack([rows[tuple(p)] for p in prompts])


@pytest.fixture(scope="module")
def logits(tiny_model: Path, tiny_adapters: TinyAdapters) -> dict[tuple[str, str | None], torch.Tensor]:
    """(scheme, adapter) -> first-step logits of the fixed prompts."""
    out = {}
    for scheme in ("none", "int8", "int4"):
        engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=32, max_model_len=64,
                                        weight_quantization=scheme))
        engine.add_adapter(ADAPTER, tiny_adapters.paths[ADAPTER])
        for adapter in (None, ADAPTER):
            out[scheme, adapter] = _first_logits(engine, adapter)
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_linear_is_the_matmul_by_its_dequantized_weight(scheme: str) -> None:
    g = torch.Generator().manual_seed(0)
    w, x, bias = torch.randn(96, 128, generator=g), torch.randn(5, 3, 128, generator=g), torch.randn(96, generator=g)
    q = quantize_tensor(w, scheme)
    weight = q if isinstance(q, nn.Module) else nn.Parameter(q, requires_grad=False)
    dequantized = q.dequantize().float()
    if scheme == "int8":  # symmetric, one float32 scale per row
        step, slack = w.abs().amax(1, keepdim=True) / 127, 1e-6
    else:  # asymmetric over the row's group of 128; bf16 scales, zeros and output round a little more
        step, slack = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15, 0.06  # worst of 40 seeds: 0.041
    assert ((dequantized - w).abs() <= step / 2 + slack).all()  # within half a step
    out = linear(x, weight, bias)
    reference = torch.nn.functional.linear(x.to(torch.bfloat16).float(), dequantized, bias)  # bf16 activations
    assert out.shape == (5, 3, 96)
    # the kernels round their output to bf16 (8 bits of mantissa); worst of 40 seeds: 0.6 % of the range
    assert ((out - reference).abs() <= 2e-2 * reference.abs().max()).all()


def test_int8_and_int4_weights_take_a_quarter_and_an_eighth_of_fp32() -> None:
    w = torch.randn(256, 512)
    # int8, and per row a float32 scale and an int8 zero point (torchao keeps one, zero, when symmetric)
    assert tensor_nbytes(quantize_tensor(w, "int8")) == 256 * 512 + 256 * (4 + 1)
    int4 = quantize_tensor(w, "int4")
    assert isinstance(int4, Int4CPUWeight)
    assert sum(tensor_nbytes(b) for b in int4.buffers()) == 256 * 512 // 2 + (512 // 128) * 256 * 2 * 2


def test_the_quantized_model_keeps_its_lora_delta_unquantized(tiny_model: Path) -> None:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=32,
                                    weight_quantization="int4"))
    layer = engine.runner.model.layers[0]
    assert isinstance(layer.qkv_weight, Int4CPUWeight) and type(layer.down_weight).__name__ != "Parameter"
    assert engine.runner.slots.pools[0].a_all["qkv"].dtype == torch.float32  # adapter slots as before


@pytest.mark.parametrize("scheme,max_kl,margin,min_clear", [("int8", 1e-3, 0.1, 20), ("int4", 0.05, 0.5, 4)])
def test_next_token_agreement_and_kl_against_fp32(logits: dict[tuple[str, str | None], torch.Tensor],
                                                  scheme: str, max_kl: float, margin: float, min_clear: int) -> None:
    """Against fp32 on 64 fixed prompts, with and without the adapter: small KL, and the same top-1
    wherever fp32 leads by more than `margin` logits (0.1 for int8, 0.5 for int4: int4's logit error
    on this random model reaches 1.2). Measured: int8 KL 1.3e-4 nats, all 38 clear choices kept;
    int4 KL 0.024 nats, all 6 kept (71 % of the 38 with a 0.1 lead)."""
    for adapter in (None, ADAPTER):
        a = Agreement.of(logits["none", adapter], logits[scheme, adapter], margin)
        assert a.kl < max_kl, a
        assert a.num_clear >= min_clear and a.clear_agreement >= 0.95, a


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_adapter_changes_a_quantized_model_as_it_changes_fp32(
        logits: dict[tuple[str, str | None], torch.Tensor], scheme: str) -> None:
    """LoRA on top of a quantized base: the adapter's effect on the logits is fp32's, up to the
    quantization error of the base (the delta itself is not quantized)."""
    delta = logits["none", ADAPTER] - logits["none", None]
    delta_q = logits[scheme, ADAPTER] - logits[scheme, None]
    assert delta.abs().max() > 0.05  # the adapter does change the model
    error = (delta_q - delta).abs().max() / delta.abs().max()
    assert error < (0.1 if scheme == "int8" else 0.5), error  # measured: 0.028 and 0.33


def test_weight_bytes_of_the_tiny_model_shrink(tiny_model: Path) -> None:
    sizes = {}
    for scheme in ("none", "int8", "int4"):
        engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=2, max_model_len=32,
                                        weight_quantization=scheme))
        sizes[scheme] = weight_nbytes(engine.runner.model)
    assert sizes["none"] > sizes["int8"] > sizes["int4"]


def test_fp8_is_refused_off_a_hopper_gpu_with_the_reason(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"compute capability 8\.9 or newer.*this device is cpu"):
        LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=2, max_model_len=32, weight_quantization="fp8"))
    with pytest.raises(ConfigError, match="weight_quantization must be one of"):
        quantize_weights(nn.Linear(2, 2), "int3")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_schemes_on_cuda_agree_with_bf16(tmp_path: Path, scheme: str) -> None:
    """Run by `pytest -m gpu` on a CUDA machine (CI deselects it): bf16 reference, the tinygemm int4
    kernel, torchao's int8 dispatch, fp8 matmuls on Ada/Hopper (refused with the reason before them).
    Hidden 256 and intermediate 512: tinygemm packs in_features in tiles of 128."""
    tiny_model = make_tiny_model(tmp_path / "model", hidden_size=256, intermediate_size=512)
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ConfigError, match=r"compute capability 8\.9 or newer"):
            LLMEngine(EngineConfig(model_path=tiny_model, device="cuda", dtype="bfloat16", weight_quantization="fp8"))
        return
    results = {}
    for s in ("none", scheme):
        engine = LLMEngine(EngineConfig(model_path=tiny_model, device="cuda", dtype="bfloat16", max_num_seqs=32,
                                        max_model_len=64, weight_quantization=s))
        results[s] = _first_logits(engine, None)
    a = Agreement.of(results["none"], results[scheme], margin=0.5)
    assert a.kl < 1e-2 and (a.num_clear == 0 or a.clear_agreement >= 0.9), a
