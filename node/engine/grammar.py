"""Grammars that constrain a sequence's tokens: JSON, a JSON schema, or tool calls (xgrammar).

The service hands the engine a `GrammarSpec` (a plain, hashable value in `SamplingParams`); the
engine compiles it once per spec for its tokenizer (`GrammarCompiler`, an LRU over compiled
grammars), gives each sequence its own `GrammarState`, fills that sequence's row of the step's
token bitmask before sampling and advances the state with every accepted token. The stop tokens
(EOS) are allowed only once the grammar is complete. Every token must also keep the output valid UTF-8
(`utf8_tokens`: xgrammar takes the bytes of surrogates for characters).

xgrammar was picked over llguidance by measurement on this CPU (outlines-core was not tried: no
structural tags for tool calls). Compiling a new schema: p50 2.4 ms / p99 53 ms (llguidance 1.3 / 72 ms,
bench/structured.py, vocab 8,000); filling a 16-row bitmask: 0.27 ms against 0.22 ms at vocab 8,000
and 0.17 ms against 8 ms at vocab 512 (the test tokenizer). Beyond speed: it releases the GIL while it
compiles (the event loop and engine go on), its structural tags express tool calls that are optional
in free text (`auto`) or forced (`required`, a named function), and it ships CUDA bitmask kernels.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase
from xgrammar import structural_tag as st

from node.engine.utf8_tokens import REJECT, START, Utf8Tokens, bitmask_of
from node.errors import BadRequest

GrammarKind = Literal["json_object", "json_schema", "tool_calls"]
MAX_SCHEMA_CHARS = 65_536  # a schema's JSON text
MAX_SCHEMA_DEPTH = 32  # JSON containers nested in a schema (2 per object level) (compile time grows fast with depth)
# the product of a `pattern`'s repetition counts ([a-z]{1,3000} takes 5 s to compile), added up over every
# pattern of a grammar (a schema's, or all its tools'): a compile cannot be stopped once started
MAX_PATTERN_REPEAT = 1024
MAX_CACHED_GRAMMARS = 512
# Tool calls are written as Hermes / Qwen2 chat templates expect them:
#   <tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>
TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>\n", "\n</tool_call>"


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: str  # the JSON schema of its arguments, as JSON text


@dataclass(frozen=True)
class GrammarSpec:
    """What a sequence's output must match. `schema` is JSON text (json_schema); `tools`, `is_forced`
    (at least one call and no free text) and `is_parallel` (more than one call) are for tool_calls."""

    kind: GrammarKind
    schema: str = ""
    is_strict: bool = True  # json_schema: no properties beyond those listed unless the schema allows them
    tools: tuple[ToolSpec, ...] = ()
    is_forced: bool = False
    is_parallel: bool = True

    @classmethod
    def json_schema(cls, schema: dict[str, Any], is_strict: bool = True) -> GrammarSpec:
        return cls("json_schema", schema=_canonical(schema), is_strict=is_strict)

    @classmethod
    def tool_calls(cls, tools: list[tuple[str, dict[str, Any]]], is_forced: bool, is_parallel: bool) -> GrammarSpec:
        specs = tuple(ToolSpec(name, _canonical(params)) for name, params in tools)
        return cls("tool_calls", tools=specs, is_forced=is_forced, is_parallel=is_parallel)


class GrammarState:
    """One sequence's place in its grammar, and inside a UTF-8 character (`utf8_tokens`)."""

    def __init__(self, matcher: xgr.GrammarMatcher, masks: torch.Tensor, utf8: Utf8Tokens,
                 utf8_state: int = START) -> None:
        self.matcher = matcher
        self.masks = masks  # [utf8 states, ceil(vocab / 32)] int32: tokens allowed at all in each
        self.utf8 = utf8
        self.utf8_state = utf8_state

    def fork(self) -> GrammarState:
        """An independent copy at the same place."""
        return GrammarState(self.matcher.fork(), self.masks, self.utf8, self.utf8_state)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.masks[self.utf8_state]

    def allows(self, token_id: int) -> bool:
        """Whether `token_id` may come next (on a copy: nothing changes)."""
        if not (int(self.masks[self.utf8_state, token_id // 32]) >> (token_id % 32)) & 1:
            return False
        return bool(self.matcher.fork().accept_token(token_id))

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (nothing changes)."""
        utf8_state = self.utf8.next_state[self.utf8_state][token_id]
        if utf8_state == REJECT or not self.matcher.accept_token(token_id):
            return False
        self.utf8_state = utf8_state
        return True

    @property
    def is_complete(self) -> bool:
        """The output so far is a whole answer (a stop token may end it now)."""
        return bool(self.matcher.is_completed())


class GrammarCompiler:
    """Compiles grammars for one tokenizer (its token table is built once, here) and keeps the last
    MAX_CACHED_GRAMMARS compiled. Thread-safe: the API compiles before admission, the engine looks up."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        spelled = info.decoded_vocab[:vocab_size]
        self._utf8 = Utf8Tokens(spelled, stop_token_ids)
        # compact JSON never holds a raw control character (xgrammar 0.2.9 lets some into strings
        # with a maxLength); tool calls keep their newlines, and their arguments are read leniently
        self._json_masks = self._utf8.masks & _tokens_without_control_bytes(spelled, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; BadRequest when the schema is invalid or too large."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiled = self._compile(spec)  # outside the lock: other specs compile meanwhile
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def is_cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def state(self, spec: GrammarSpec) -> GrammarState:
        masks = self._json_masks if spec.kind in ("json_object", "json_schema") else self._utf8.masks
        return GrammarState(xgr.GrammarMatcher(self.compile(spec)), masks, self._utf8)

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            if spec.kind == "json_schema":
                _check_size(spec.schema, "schema", MAX_PATTERN_REPEAT)
                return self._compiler.compile_json_schema(spec.schema, any_whitespace=False,
                                                          strict_mode=spec.is_strict)
            room = MAX_PATTERN_REPEAT  # shared by every tool's patterns
            for tool in spec.tools:
                room -= _check_size(tool.parameters, f"tool {tool.name}", room)
            return self._compiler.compile_structural_tag(_tool_call_tag(spec))
        except (RuntimeError, ValueError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as exc:
            raise BadRequest(f"the schema cannot be compiled: {str(exc).strip()[-300:]}") from exc


def _tokens_without_control_bytes(spelled: list[bytes], stop_token_ids: list[int]) -> torch.Tensor:
    """[ceil(vocab / 32)] int32 bitmask of the tokens that spell no byte below 0x20, and the stop tokens."""
    allowed = torch.tensor([all(b >= 0x20 for b in data) for data in spelled])
    allowed[stop_token_ids] = True
    return bitmask_of(allowed)


def _tool_call_tag(spec: GrammarSpec) -> st.StructuralTag:
    tags = [st.TagFormat(begin=f'{TOOL_CALL_BEGIN}{{"name": {json.dumps(t.name)}, "arguments": ',
                         content=st.JSONSchemaFormat(json_schema=json.loads(t.parameters), max_whitespace_cnt=1),
                         end="}" + TOOL_CALL_END) for t in spec.tools]
    fmt: st.Format
    if spec.is_forced:
        fmt = st.TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                         stop_after_first=not spec.is_parallel)
    else:
        fmt = st.TriggeredTagsFormat(triggers=[TOOL_CALL_BEGIN.strip()], tags=tags, at_least_one=False,
                                     stop_after_first=not spec.is_parallel)
    return st.StructuralTag(format=fmt)


def _canonical(schema: dict[str, Any]) -> str:
    """The schema's compact JSON text, its keys in the order given (the order properties are written in)."""
    return json.dumps(schema, separators=(",", ":"))


def _check_size(schema: str, what: str, max_repeat: int) -> int:
    """BadRequest unless the schema is within the bounds, its patterns' repetition counts (multiplied
    per pattern) adding up to at most `max_repeat`; returns that sum."""
    if len(schema) > MAX_SCHEMA_CHARS:
        raise BadRequest(f"the {what} has {len(schema)} characters; at most {MAX_SCHEMA_CHARS} are compiled",
                         num_chars=len(schema), max_chars=MAX_SCHEMA_CHARS)
    depth, patterns = _walk(json.loads(schema))
    if depth > MAX_SCHEMA_DEPTH:
        raise BadRequest(f"the {what} nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are compiled",
                         depth=depth, max_depth=MAX_SCHEMA_DEPTH)
    repeat = sum(math.prod(int(hi or lo) for lo, hi in _REPEAT.findall(pattern)) for pattern in patterns)
    if repeat > max_repeat:
        raise BadRequest(f"the {what} has patterns whose repetition counts (multiplied per pattern) add up to "
                         f"{repeat}; at most {max_repeat} more are compiled (a request's patterns share "
                         f"{MAX_PATTERN_REPEAT})", repeat=repeat, max_repeat=max_repeat)
    return repeat


_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")  # {n}, {n,m}, {n,}


def _walk(node: object) -> tuple[int, list[str]]:
    """Nesting of JSON containers and every `pattern` string, iteratively (a hostile schema must not
    exhaust the Python stack)."""
    deepest, patterns, stack = 0, [], [(node, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
            if isinstance(item, dict) and isinstance(item.get("pattern"), str):
                patterns.append(item["pattern"])
    return deepest, patterns
