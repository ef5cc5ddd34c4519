"""How far a quantized model's next-token distributions are from the reference's, on the same prompts.

A random-weight model's top logits are nearly tied, so plain top-1 agreement mostly measures ties:
a rounding error of a hundredth flips a choice that a trained model, whose top-1 leads by whole
logits, would never flip. Sharpening the reference (scaling its LM head) does not help: the
quantization error passes through the same head and grows with it. So three figures, each meaning
one thing:
- kl: mean KL(reference || quantized) in nats over all positions (what sampling sees);
- agreement: top-1 agreement over all positions (ties included: a floor, not the figure);
- clear_agreement: top-1 agreement where the reference's top-1 leads its top-2 by more than `margin`
  logits (the choices a small error must not flip), with how many positions that is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Agreement:
    num_positions: int
    kl: float  # mean KL(reference || quantized), nats
    agreement: float  # top-1 agreement over all positions
    clear_agreement: float  # top-1 agreement where the reference leads by more than `margin`
    num_clear: int
    margin: float
    max_logit_error: float  # max |quantized - reference| logit

    @classmethod
    def of(cls, reference: torch.Tensor, quantized: torch.Tensor, margin: float) -> Agreement:
        """reference, quantized: [positions, vocab] logits of the same prompts."""
        ref, q = reference.float(), quantized.float()
        log_p, log_q = ref.log_softmax(-1), q.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [positions]
        same = ref.argmax(-1) == q.argmax(-1)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > margin
        return cls(num_positions=ref.shape[0], kl=kl.mean().item(), agreement=same.float().mean().item(),
                   clear_agreement=same[clear].float().mean().item() if clear.any() else float("nan"),
                   num_clear=int(clear.sum()), margin=margin, max_logit_error=(q - ref).abs().max().item())
