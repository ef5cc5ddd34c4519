"""A request's state inside the engine, and what the engine hands back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from node.engine.detokenize import IncrementalText
from node.engine.grammar import GrammarState
from node.engine.logprob import TokenLogprob
from node.engine.penalty import TokenCounts
from node.engine.sampling import SamplingParams
from node.errors import NodeError


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while running
    num_prompt_tokens: int
    num_completion_tokens: int
    adapter_id: str | None = None
    error: NodeError | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked


@dataclass(frozen=True)
class StreamDelta:
    request_id: str
    token_ids: list[int]  # new since the previous delta
    text: str  # new text since the previous delta
    finish_reason: str | None  # set on the last delta only
    num_prompt_tokens: int
    num_completion_tokens: int
    error: NodeError | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token id, when the request asked
    # whole characters generated but not sent yet (a stop string's possible start) and their tokens: what a
    # client that hangs up now is charged for beyond what it was sent (output.py); none once finished
    held_text: str = ""
    num_held_tokens: int = 0
    held_logprobs: list[TokenLogprob] | None = None  # theirs, when the request asked


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    arrival: int  # admission order, for FCFS
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of its first full blocks (block_hash)
    num_committed_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    finish_reason: str | None = None
    error: NodeError | None = None
    generator: torch.Generator | None = None
    text: str = ""  # completion text so far (stop strings cut)
    num_preemptions: int = 0
    is_placed: bool = False  # its adapter had a device slot for one of its steps (so the next is not its first)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    stop_search_from: int = 0  # stop strings are looked for from this character (see min_tokens)
    grammar: GrammarState | None = None  # where its output stands in params.grammar
    num_cut_tokens: int = 0  # last tokens that spell an unfinished character: left out of the answer (output.py)
    detok: IncrementalText = field(default_factory=IncrementalText)  # its text, decoded a window per step
    counts: TokenCounts = field(init=False)  # its history's token counts, for its penalties (penalty.py)

    def __post_init__(self) -> None:
        self.counts = TokenCounts(self.prompt_token_ids, self.output_token_ids)

    @property
    def num_answer_tokens(self) -> int:
        """The completion tokens its answer is made of: what it is charged for."""
        return len(self.output_token_ids) - self.num_cut_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without copying the rest of the history (a decode step reads one token)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def finish(self, reason: str, error: NodeError | None = None) -> None:
        self.status, self.finish_reason, self.error = SequenceStatus.FINISHED, reason, error

    def to_output(self) -> RequestOutput:
        n = self.num_answer_tokens
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=list(self.prompt_token_ids),
            token_ids=self.output_token_ids[:n], text=self.text, finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_token_ids), num_completion_tokens=n,
            adapter_id=self.adapter_id, error=self.error,
            logprobs=self.output_logprobs[:n] if self.params.logprobs is not None else None,
        )
