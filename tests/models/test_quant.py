"""Weight-only int8: round trip, the kernel and the fallback agree, and its accuracy cost on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from node.models.quant import Int8Weight, linear

PROMPTS = ["The sea is", "Count: one two", "Stars and", "Bread with butter", "A B C D"]


def test_int8_weight_is_within_half_a_step_per_channel() -> None:
    w = torch.randn(48, 40) * torch.linspace(0.01, 3.0, 48)[:, None]  # very different channel ranges
    q = Int8Weight(w)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (48,)
    step = w.abs().amax(dim=1) / 127
    assert ((q.dequantize() - w).abs() <= step[:, None] / 2 + 1e-6).all()


def test_the_fused_matmul_and_the_dequantizing_one_agree() -> None:
    w, x, bias = torch.randn(24, 32), torch.randn(5, 3, 32), torch.randn(24)
    q = Int8Weight(w)
    fused = linear(x, q, bias)
    reference = torch.nn.functional.linear(x, q.dequantize(), bias)
    assert fused.shape == (5, 3, 24)
    assert torch.allclose(fused, reference, atol=1e-4)


def _greedy(tiny_model: Path, quantization: str) -> tuple[list[list[int]], list[torch.Tensor]]:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=64,
                                    weight_quantization=quantization))
    first: list[torch.Tensor] = []

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        if not first:
            first.append(logits.clone())

    engine.runner.logits_observer = observe
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outputs], first


def test_int8_accuracy_cost_on_the_tiny_model(tiny_model: Path) -> None:
    """First-step logits stay within 5 % of fp32's range, and greedy picks agree wherever fp32's lead is
    wider than twice that error. Measured: 2.1 % logit error; 41 of 80 greedy tokens identical, since a
    random tiny model's top logits are nearly tied (a trained model's are not): docs/engine.md."""
    tokens, logits = _greedy(tiny_model, "none")
    tokens8, logits8 = _greedy(tiny_model, "int8")
    abs_error = (logits8[0] - logits[0]).abs().max()
    assert abs_error / logits[0].abs().max() < 0.05
    top2 = logits[0].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * abs_error  # rows where fp32's choice cannot flip
    assert clear.any()
    assert torch.equal(logits8[0][clear].argmax(-1), logits[0][clear].argmax(-1))
    assert [seq[0] for seq, ok in zip(tokens, clear.tolist(), strict=True) if ok] == \
        [seq[0] for seq, ok in zip(tokens8, clear.tolist(), strict=True) if ok]
