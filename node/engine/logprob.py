"""The logprobs a request asked for: the sampled token's and the k most likely, per sampled row.

They are the log-softmax of the logits as adjusted for the request (penalties, logit_bias, min_tokens
and, where a request has one, its allowed-token mask), before temperature, top-k and top-p: the
model's distribution under the request's constraints, comparable across temperatures, as OpenAI's
are (vLLM's default, raw logprobs, would ignore the penalties the token was drawn under). A masked
token's logprob is LOGPROB_FLOOR rather than -inf (JSON has no infinity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.engine.sampling import SamplingParams

LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams],
                   ) -> list[TokenLogprob | None]:
    """logits [N, vocab] (adjusted) and each row's sampled token -> its logprobs, None where not asked."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    found: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return found
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits.index_select(0, index).float().log_softmax(dim=-1).clamp(min=LOGPROB_FLOOR)  # [R, vocab]
    chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in rows], device=logits.device))  # [R, 1]
    k = max(params[i].logprobs or 0 for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())  # [R, k]
    chosen_list, values, ids = chosen.squeeze(1).tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        wanted = params[i].logprobs or 0
        found[i] = TokenLogprob(token_ids[i], chosen_list[j],
                                tuple(zip(ids[j][:wanted], values[j][:wanted], strict=True)))
    return found
