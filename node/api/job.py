"""One paid request on its way through the engine: what was asked and held (`Job`), how it is cut short
(`Cut`), what a stream has sent so far (`Sent`), and the engine's params for each of its choices."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node.api.choice import ChoiceOutput, Kind, ResponseShape, TokenText
from node.api.engine_client import EngineClient
from node.api.hang_up_budget import Ticket
from node.api.schemas import ChatCompletionRequest, CompletionRequest
from node.catalog import ServedAdapter
from node.engine import SamplingParams
from node.engine.grammar import GrammarSpec
from node.engine.logprob import TokenLogprob
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import NodeError, Unavailable
from node.payment.service import Hold, Usage

log = logging.getLogger(__name__)

Finished = StreamDelta | RequestOutput  # a request's end: the last delta of a stream, or the whole output
CLIENT_LEFT, TIME_LIMIT = "abort", "length"  # the finish reasons of an answer the node cut short


@dataclass(frozen=True)
class Job:
    kind: Kind
    request: CompletionRequest | ChatCompletionRequest
    response_id: str  # derived from the voucher: a replay answers with the same id
    request_id: str  # the engine's: unique per request, so two requests never share a listener
    created: int
    adapter: ServedAdapter
    prompt_ids: list[int]
    params: SamplingParams
    hold: Hold
    held_at: float  # time.monotonic() when the hold was asked for: its time limits count from there
    ticket: Ticket  # its standing with its payer's hang-up budget (node/api/hang_up_budget.py)

    @classmethod
    def of(cls, kind: Kind, req: CompletionRequest | ChatCompletionRequest, adapter: ServedAdapter,
           prompt_ids: list[int], params: SamplingParams, held: Hold, held_at: float, ticket: Ticket) -> Job:
        """The job of a request whose payment holds, named after its voucher."""
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{held.checked.digest.hex()[:24]}"
        return cls(kind, req, response_id, f"{response_id}-{secrets.token_hex(6)}", int(time.time()), adapter,
                   prompt_ids, params, held, held_at, ticket)

    def time_left(self, limit_s: float) -> float:
        """Seconds left of `limit_s` counted from the hold (a grammar's compile, up to 5 s, runs after it)."""
        return max(limit_s - (time.monotonic() - self.held_at), 0.0)

    @property
    def choice_ids(self) -> list[str]:
        """The engine's request id of each choice."""
        n = self.request.num_choices
        return [self.request_id] if n == 1 else [f"{self.request_id}-{i}" for i in range(n)]

    @property
    def choice_params(self) -> list[SamplingParams]:
        """Each choice's params: with a seed, choice i draws with seed + i (else n equal answers)."""
        n, seed = self.request.num_choices, self.params.seed
        if seed is None:
            return [self.params] * n
        return [dataclasses.replace(self.params, seed=(seed + i) % 2**63) for i in range(n)]

    def shape(self, token_text: TokenText) -> ResponseShape:
        return ResponseShape(self.kind, {"id": self.response_id, "created": self.created,
                                         "model": self.request.model}, token_text,
                             calls_tools=self.calls_tools, call_id_prefix=self.response_id.rsplit("-", 1)[-1][:16])

    @property
    def calls_tools(self) -> bool:
        return isinstance(self.request, ChatCompletionRequest) and self.request.calls_tools


class Cut:
    """Ends a request early on the node's side, remembering why (the client left, or the time limit):
    the engine then reports its choices as aborted with what they had generated."""

    def __init__(self, engine: EngineClient, request_ids: list[str]) -> None:
        self.engine, self.request_ids = engine, request_ids
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            for request_id in self.request_ids:
                self.engine.abort(request_id)

    def ending(self, final: Finished) -> str:
        """How the request ended: its finish reason, or why it was cut; a node fault raises."""
        if final.finish_reason == "abort" and self.reason is not None:
            return self.reason
        _raise_if_failed(final)
        return final.finish_reason or "stop"


@dataclass
class Sent:
    """What a stream has produced so far, choice by choice, and whether its hold has ended (charged,
    released, lost). The hold ends once: every ending takes `lock` and checks `is_settled` (a hang-up
    can race the charge)."""

    num_prompt_tokens: int
    num_choices: int = 1
    holds_back: bool = False  # the text goes out whole in the last chunk (tool calls), not token by token
    tokens: list[int] = field(default_factory=list)  # completion tokens generated and sent, per choice
    held: list[tuple[str, int]] = field(default_factory=list)  # text generated, not sent yet, and its tokens
    held_logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # theirs
    parts: list[list[str]] = field(default_factory=list)  # text sent, per choice
    chars: list[int] = field(default_factory=list)  # its length
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    endings: list[str | None] = field(default_factory=list)
    is_sent: bool = False  # some text (or logprobs) left the node (never, before the end, when it holds back)
    is_settled: bool = False
    is_closed: bool = False  # the hold's time ran out while it was being read: nothing more is added or sent
    is_cut: bool = False  # a choice was cut short (aborted; raised before `add` unless the node's time limit cut it)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        n = self.num_choices
        self.tokens, self.chars, self.parts, self.endings = [0] * n, [0] * n, [[] for _ in range(n)], [None] * n
        self.logprobs, self.held, self.held_logprobs = [[] for _ in range(n)], [("", 0)] * n, [[] for _ in range(n)]

    def add(self, index: int, delta: StreamDelta) -> int:
        """Record the choice's delta; returns the length of its text before it (the delta's text offset)."""
        offset = self.chars[index]
        self.tokens[index], self.chars[index] = delta.num_completion_tokens, offset + len(delta.text)
        self.held[index] = (delta.held_text, delta.num_held_tokens)
        self.held_logprobs[index] = delta.held_logprobs or []
        self.is_cut = self.is_cut or delta.finish_reason == "abort"
        if delta.text:
            self.parts[index].append(delta.text)
        self.logprobs[index].extend(delta.logprobs or [])
        self.is_sent = self.is_sent or (not self.holds_back and bool(delta.text or delta.logprobs))
        return offset

    @property
    def is_owed(self) -> bool:
        """A client that leaves now pays: some text left the node, or was generated for it and held back (a
        stop string's possible start; tool calls, which go out whole)."""
        return self.is_sent or any(n for _, n in self.held) or (self.holds_back and any(self.tokens))

    @property
    def usage(self) -> Usage:
        """The completion tokens sent and held back: what a client that leaves now is charged for."""
        return Usage(self.num_prompt_tokens, sum(self.tokens) + sum(n for _, n in self.held))

    @property
    def is_done(self) -> bool:
        return all(e is not None for e in self.endings)

    def choices(self, asked_logprobs: bool, unfinished: str) -> list[ChoiceOutput]:
        """Every choice as sent, and the text held back from it (the answer stored for a client that left:
        the text of every token it is charged for); one still running ends with `unfinished`."""
        return [ChoiceOutput("".join(p) + held, e or unfinished, lp + held_lp if asked_logprobs else None)
                for p, e, lp, (held, _), held_lp in zip(self.parts, self.endings, self.logprobs, self.held,
                                                        self.held_logprobs, strict=True)]


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                    grammar: GrammarSpec | None = None) -> SamplingParams:
    """The engine's params for one choice of `req` (BadRequest, naming the field, when they conflict)."""
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
        seed=req.seed, stop=tuple(req.stop_strings), repetition_penalty=req.repetition_penalty or 1.0,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        logit_bias=tuple(req.bias.items()), min_tokens=req.min_tokens or 0, logprobs=req.num_logprobs,
        grammar=grammar, cache_salt=req.cache_salt)


def _raise_if_failed(delta: Finished) -> None:
    if delta.finish_reason == "error":
        raise delta.error or Unavailable("the engine failed this request")
    if delta.finish_reason == "abort":
        raise Unavailable("the request was aborted (its adapter was removed or the engine stopped)")


def as_fault(exc: Exception, response_id: str) -> NodeError:
    """A stream's failure as the node fault it is (an unexpected exception is a bug: logged, and still
    the node's, never charged as if the client had left)."""
    if isinstance(exc, NodeError):
        return exc
    log.exception("stream %s failed", response_id)
    return Unavailable(f"the node failed this stream ({type(exc).__name__})")


def once(action: Callable[[], object]) -> Callable[[], None]:
    """`action` run by the first call only (a stream leaves its admission at its end or at its closing,
    whichever comes first: both on the event loop)."""
    left = False

    def leave() -> None:
        nonlocal left
        if not left:
            left = True
            action()

    return leave
