"""A step's detokenising work does not grow with the answer. Before, `check_stop` decoded a streamed (or
stop-string) sequence's whole output on every step: an 8,000-token paid stream cost the step thread about
11.6 s of decoding on the tiny tokenizer (the square of its length), priced linearly, and every other
payer's tokens waited behind it. Now each step decodes a window of its last few tokens; what a client
sees is what the whole-output decoding gave (`reference_output.py`, the code before, is the oracle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.output import OutputProcessor
from node.engine.sequence import Sequence, StreamDelta
from node.engine.token_bytes import byte_level_alphabet
from tests.engine.reference_output import ReferenceOutputProcessor
from tests.engine.test_output import step_through
from tests.fixtures.tokenizers import byte_fallback_tokenizer

MAX_WINDOW = 64  # the most tokens one decode may be given (a window, never the whole answer)
TEXT = "the river runs to the sea, 中文 and café ☃ 🌊 under   stars.\n" * 40


class DecodeSpy:
    """Wraps a real tokenizer's decode and records how many ids each call was given."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.sizes: list[int] = []
        self._decode = tokenizer.decode

        def decode(ids: Any, *args: Any, **kwargs: Any) -> Any:
            self.sizes.append(len(ids))
            return self._decode(ids, *args, **kwargs)

        tokenizer.decode = decode  # type: ignore[method-assign]


def _tokenizers(tiny_model: Path) -> dict[str, Callable[[], PreTrainedTokenizerBase]]:
    return {"byte_level": lambda: AutoTokenizer.from_pretrained(tiny_model), "byte_fallback": byte_fallback_tokenizer}


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest, tiny_model: Path) -> PreTrainedTokenizerBase:
    return _tokenizers(tiny_model)[request.param]()


Processor = OutputProcessor | ReferenceOutputProcessor


def _run(outputs: Processor, ids: list[int], is_streamed: bool, stop: tuple[str, ...] = (), max_tokens: int = 0,
         min_tokens: int = 0) -> tuple[list[StreamDelta], Sequence]:
    """Append `ids` one step at a time as the engine does; the stream's deltas and the sequence."""
    max_tokens = max_tokens or len(ids)
    params = SamplingParams(max_tokens=max_tokens, logprobs=0, stop=stop, min_tokens=min(min_tokens, max_tokens))
    seq = Sequence("r", [1, 2], params, None, 0)
    return step_through(outputs, seq, ids, is_streamed), seq


@pytest.mark.parametrize("is_streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_a_long_answer_costs_each_step_a_window_of_decoding_not_the_whole_output(
        tiny_model: Path, kind: str, is_streamed: bool) -> None:
    tokenizer = _tokenizers(tiny_model)[kind]()  # its own: the spy stays on it
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:1_500]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    spy = DecodeSpy(tokenizer)
    outputs = OutputProcessor(tokenizer, frozenset({tokenizer.eos_token_id}), max_model_len=10_000)
    deltas, seq = _run(outputs, ids, is_streamed, stop=("NEVER SAID",))
    assert seq.finish_reason == "length" and seq.text == whole
    if is_streamed:
        assert "".join(d.text for d in deltas) == seq.text
    assert max(spy.sizes) <= MAX_WINDOW, "no step decodes the whole output"
    assert sum(spy.sizes) <= 12 * len(ids), "the decoding work grows with the answer, not with its square"


def test_a_streamed_answer_from_the_engine_decodes_windows_only(tiny_model: Path) -> None:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=512))
    spy = DecodeSpy(engine.tokenizer)
    deltas: list[StreamDelta] = []
    engine.add_request("The river runs", SamplingParams(max_tokens=400, temperature=1.0, seed=3, ignore_eos=True,
                                                        stop=("NEVER SAID",)),
                       request_id="long", listener=deltas.append)
    while not deltas or deltas[-1].finish_reason is None:
        engine.step()
    assert deltas[-1].finish_reason == "length"
    assert max(spy.sizes) <= MAX_WINDOW and sum(spy.sizes) <= 12 * 400


_PIECES = ["a", "b", " ", "ab", "END", "EN", "D", "\u2581", "中", "é", "🌊", "\ufffd", "\n", "  x", "<s>"]
_BYTES = [b"\xe4", b"\xb8", b"\xad", b"\xd7", b"\xf0\x9f", b"\x8c\x8a"]
_STOPS = ["END", "b a", "中", "a\u2581", " ", "ba", "x" * 40 + "a", "\ufffd"]


def _ids_of(tokenizer: PreTrainedTokenizerBase, parts: list[str | bytes]) -> list[int]:
    """Token ids for text pieces (as the tokenizer spells them) and raw bytes (one token per byte)."""
    vocab, ids = tokenizer.get_vocab(), list[int]()
    alphabet = {b: c for c, b in byte_level_alphabet().items()}
    for part in parts:
        if part == "<s>":
            ids.append(tokenizer.bos_token_id)
        elif isinstance(part, str):
            ids += tokenizer.encode(part, add_special_tokens=False)
        else:
            ids += [vocab.get(f"<0x{b:02X}>", vocab.get(alphabet[b], 0)) for b in part]
    return ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from([*_PIECES, *_BYTES]), max_size=24),
       stops=st.lists(st.sampled_from(_STOPS), max_size=2),
       is_streamed=st.booleans(), cut=st.integers(0, 6), min_tokens=st.integers(0, 4))
def test_what_a_client_sees_is_what_decoding_the_whole_output_gave(
        tokenizer: PreTrainedTokenizerBase, parts: list[str | bytes], stops: list[str], is_streamed: bool,
        cut: int, min_tokens: int) -> None:
    """The answer (text, tokens, counts) always; delta for delta (text, held back text, tokens) wherever the old
    code's stream agreed with its answer. Stop strings span tokens (and begin in text already sent: the
    41-character one). Where it did not (a byte-fallback run of bytes that spelled whole characters, then
    turned broken: its stream had sent a character the answer says U+FFFD for), the old stream's deltas are
    not a standard to keep."""
    ids = _ids_of(tokenizer, parts)
    assume(ids)
    max_tokens = max(len(ids) - cut, 1)
    eos = frozenset({tokenizer.eos_token_id})
    old_deltas, old = _run(ReferenceOutputProcessor(tokenizer, eos, 1_000), ids, is_streamed, tuple(stops),
                           max_tokens, min_tokens)
    old_out = old.to_output()
    new_deltas, new = _run(OutputProcessor(tokenizer, eos, 1_000), ids, is_streamed, tuple(stops), max_tokens,
                           min_tokens)
    assert new.to_output() == old_out
    if "".join(d.text for d in old_deltas) == old_out.text or not is_streamed:
        assert new_deltas == old_deltas
