"""transformers + peft as the reference our engine is held against (float32, CPU)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

MAX_HELD_BACK = 3  # tokens of a character left unfinished at an answer's end: UTF-8 has 4 bytes at most


def chosen_tokens(answer: list[int], rows: torch.Tensor) -> list[int]:
    """Every token a greedy engine chose (the argmax of each step's logits, `rows`: [steps, vocab]).
    The answer holds them all but those of a character left unfinished at its end, which it leaves
    out and does not charge for (node/engine/output.py)."""
    chosen = rows.argmax(-1).tolist()
    assert answer == chosen[:len(answer)], "the answer is not the tokens the engine chose"
    assert len(chosen) - len(answer) <= MAX_HELD_BACK, "more left out than one unfinished character"
    return chosen


class PeftReference:
    """The base model with every adapter loaded under its id; `None` means the base model."""

    def __init__(self, model_path: Path, adapters: dict[str, Path]):
        base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model: PreTrainedModel | PeftModel = base.eval()
        for i, (name, path) in enumerate(adapters.items()):
            if i == 0:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)

    def _use(self, adapter_id: str | None):
        if adapter_id is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
        self.model.set_adapter(adapter_id)
        return nullcontext()

    @torch.inference_mode()
    def logits(self, token_ids: list[int], adapter_id: str | None) -> torch.Tensor:
        """[len(token_ids), vocab] logits of one full forward (position t predicts token t + 1)."""
        with self._use(adapter_id):
            return self.model(torch.tensor([token_ids])).logits[0].float()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int, adapter_id: str | None) -> list[int]:
        with self._use(adapter_id):
            out = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                      min_new_tokens=max_tokens, pad_token_id=0)
        return out[0, len(prompt):].tolist()
