"""One check for every family: our engine against transformers + peft, token for token.

A tiny checkpoint written by transformers' own class, two peft adapters trained on it, and
prompts served by our engine under the base model and each adapter, mixed in one batch: every
step's logits within `atol` of transformers' and the greedy tokens identical to transformers'
(the argmax of its logits after each of our prefixes, which by induction is its greedy output).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from node.devkit import train_tiny_adapter
from node.devkit.corpus import STYLES
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from tests.engine.reference import PeftReference, chosen_tokens

PROMPTS = ("The river runs past the old mill and", "Bees", "Numbers are counted one, two, three")


def train_adapters(model: Path, root: Path, targets: Seq[str]) -> dict[str, Path]:
    """Two adapters on every projection `targets` names: rank 8, and rank 4 with rsLoRA."""
    specs: dict[str, dict[str, Any]] = {
        "sea-r8": dict(texts=[STYLES["sea"]], rank=8, alpha=16, seed=1),
        "count-r4": dict(texts=[STYLES["count"]], rank=4, alpha=8, seed=2, use_rslora=True),
    }
    return {name: train_tiny_adapter(model, root / name, steps=2, lr=5e-3, target_modules=tuple(targets),
                                     **spec).path for name, spec in specs.items()}


def assert_matches_peft(model: Path, adapters: dict[str, Path], *, max_tokens: int = 10,
                        prompts: Seq[str] = PROMPTS, stepwise_rope: bool = False, atol: float = 1e-4,
                        **engine_config: Any) -> list[list[int]]:
    """Serve every prompt under the base model and under each adapter in one mixed batch; returns
    the generated tokens. `stepwise_rope`: compare logits with transformers' generate, one step at a
    time (rope types whose rotation depends on the sequence length, see node/models/rotary.py)
    instead of one forward over the whole text."""
    config = dict(block_size=4, max_model_len=128, max_lora_rank=8, max_adapter_slots=4) | engine_config
    engine = LLMEngine(EngineConfig(model_path=model, **config))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    names: list[str | None] = [None, *adapters]
    jobs = [(p, a) for a in names for p in prompts]
    rows: dict[str, list[torch.Tensor]] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(seq.request_id, []).append(row.clone())

    engine.runner.logits_observer = observe
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outputs = engine.generate([p for p, _ in jobs], params, [a for _, a in jobs])
    reference = PeftReference(model, adapters)
    answers = []
    for out, (_, adapter) in zip(outputs, jobs, strict=True):
        ours = torch.stack(rows[out.request_id])  # [max_tokens, vocab]
        chosen = chosen_tokens(out.token_ids, ours)
        if stepwise_rope:
            tokens, expected = _generate(reference, out.prompt_token_ids, max_tokens, adapter)
        else:  # greedy decoding picks the argmax after each of our prefixes: transformers' tokens
            full = out.prompt_token_ids + chosen
            expected = reference.logits(full[:-1], adapter)[len(out.prompt_token_ids) - 1:]
            tokens = expected.argmax(-1).tolist()
        gap = (ours - expected).abs().max().item()
        assert gap < atol, (adapter, out.request_id, gap)
        assert chosen == tokens, adapter
        answers.append(chosen)
    return answers  # every token chosen, an unfinished last character's included


@torch.inference_mode()
def _generate(reference: PeftReference, prompt: list[int], max_tokens: int, adapter: str | None,
              ) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens, one step at a time over its KV cache as `generate` runs, and the
    logits of each step [max_tokens, vocab]; past the end-of-sequence token (our engine is told to
    ignore it, and `generate(min_new_tokens=...)` would mask it out instead)."""
    tokens: list[int] = []
    rows = []
    with reference._use(adapter):
        out = reference.model(torch.tensor([prompt]), use_cache=True)
        for _ in range(max_tokens):
            rows.append(out.logits[0, -1].float())
            tokens.append(int(rows[-1].argmax()))
            out = reference.model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, torch.stack(rows)
