"""Sampling parameters and the batched sampler (per-request params within one batch).

`sample()` is the last stage of the pipeline in node/engine/sampler.py: logits adjusted per row
(penalties, bias, min_tokens: node/engine/penalty.py) -> a per-sequence mask -> here temperature,
top-k, top-p and the draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from node.engine.grammar import GrammarSpec
from node.errors import BadRequest

MIN_TEMPERATURE = 1e-5
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # logits divided by 0.01 stay finite in float32
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI's range)
MAX_LOGPROBS = 20  # the most alternatives a token's logprobs may list
MAX_CACHE_SALT_LENGTH = 256  # characters of a cache salt (a secret of 128 bits is 22 in base64)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or less: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, excluded from the text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # --- adjustments of the logits, in this order (node/engine/penalty.py), and logprobs ---------------
    repetition_penalty: float = 1.0  # over prompt + output: a seen token's logit / p if > 0, else * p (HF)
    frequency_penalty: float = 0.0  # over the output: logit -= frequency * count (OpenAI)
    presence_penalty: float = 0.0  # over the output: logit -= presence if count > 0 (OpenAI)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logit; a dict is taken
    min_tokens: int = 0  # EOS and stop_token_ids are masked until the output has this many tokens
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    grammar: GrammarSpec | None = None  # the output must match it (JSON, a JSON schema, tool calls)
    # not a sampling setting: mixed into the prefix cache's chain root (block_hash.py), so the request
    # shares cached blocks only with requests of its adapter and the same salt; None: the adapter's shared chain
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if self.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1", max_tokens=self.max_tokens)
        if not self.temperature >= 0:  # NaN too
            raise BadRequest("temperature must be >= 0", temperature=self.temperature)
        if not 0 < self.top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]", top_p=self.top_p)
        if self.cache_salt is not None and not 1 <= len(self.cache_salt) <= MAX_CACHE_SALT_LENGTH:
            raise BadRequest(f"cache_salt must have 1 to {MAX_CACHE_SALT_LENGTH} characters", param="cache_salt")
        self._check_adjustments()

    def _check_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:  # NaN too
                raise BadRequest(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}]", param=name)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise BadRequest(f"repetition_penalty must be in [{low}, {high}]", param="repetition_penalty")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise BadRequest(f"logit_bias takes token ids >= 0 and biases in [-{MAX_LOGIT_BIAS}, "
                                 f"{MAX_LOGIT_BIAS}]", param="logit_bias", token_id=token_id)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise BadRequest("min_tokens must be in [0, max_tokens]", param="min_tokens",
                             min_tokens=self.min_tokens, max_tokens=self.max_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")

    @property
    def is_adjusted(self) -> bool:
        """Whether any adjustment of the logits applies to this request (else its row is left alone)."""
        return bool(self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty
                    or self.logit_bias or self.min_tokens)

    @functools.cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (token ids [E] long, biases [E] float32) on the CPU, laid out once per request: each
        step adds them to its row with no work per entry in Python."""
        ids = torch.tensor([t for t, _ in self.logit_bias], dtype=torch.long)
        return ids, torch.tensor([b for _, b in self.logit_bias], dtype=torch.float32)

    @property
    def is_greedy(self) -> bool:
        """A temperature below MIN_TEMPERATURE is greedy: dividing logits by it overflows to inf."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           ) -> list[int]:
    """logits: [N, vocab] float32 -> one token id per row, each row with its own params."""
    next_ids = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        probs = _probabilities(logits.index_select(0, index), [params[i] for i in rows])
        for j, i in enumerate(rows):
            next_ids[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
    return next_ids.tolist()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: in each of `rows` of logits [N, vocab], every token whose bit is 0 in the matching row
    of bitmask [len(rows), ceil(vocab / 32)] int32 (bit j of word w is token 32 * w + j) gets -inf."""
    table = _BITS.to(logits.device)
    # little-endian: byte b of word w holds tokens 32 * w + 8 * b .. + 7, lowest bit first
    words = bitmask.to(logits.device, non_blocking=True).contiguous()
    allowed = table[words.view(torch.uint8).long()].flatten(1)[:, :logits.shape[-1]]  # [len(rows), vocab]
    blocked = torch.zeros_like(logits, dtype=torch.bool)
    blocked[torch.tensor(rows, device=logits.device)] = ~allowed
    logits.masked_fill_(blocked, float("-inf"))


_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # [256, 8]: the bits of each byte value


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[M, vocab] logits -> probabilities after temperature, top-k and top-p, row by row params."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temps[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    vocab = logits.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=logits.device)
    cut = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    probs_sorted = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    before = probs_sorted.cumsum(dim=-1) - probs_sorted  # mass strictly above each token
    cut = cut | (before >= top_p[:, None])
    cut[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32 kept none)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return filtered.softmax(dim=-1)


def check_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """Token ids in the params (logit_bias, stop_token_ids) must be in the model's vocabulary."""
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        if any(not 0 <= t < vocab_size for t in ids):
            raise BadRequest(f"{name} names token ids outside the vocabulary [0, {vocab_size})", param=name)
