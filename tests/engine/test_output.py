"""An answer holds whole characters, and its count the tokens that spell them: a character a byte-level
tokenizer spells over several tokens is streamed once whole (its tokens and logprobs with it), and an
answer cut inside one ends before it. Before, the last delta sent the unfinished character as U+FFFD and
counted its tokens: the payer was charged for bytes it never got. And an answer neither streamed nor
with stop strings, aborted (the time limit, a client that left), came back with no text at all.

Each holds for both ways of spelling a character over tokens: byte-level BPE (GPT-2, Llama 3, Qwen2) and
sentencepiece byte fallback (Llama 2, Mistral: `<0xE4>`, whose decoder gives one U+FFFD per byte of an
unfinished character, where byte-level gives one for all)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.logprob import TokenLogprob
from node.engine.output import MAX_HELD_CHARS, OutputProcessor
from node.engine.sequence import RequestOutput, Sequence, StreamDelta
from tests.fixtures.tokenizers import byte_fallback_tokenizer

MIDDLE = "中".encode()  # E4 B8 AD: three tokens of a byte-level tokenizer


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest, tiny_model: Path) -> PreTrainedTokenizerBase:
    if request.param == "byte_fallback":
        return byte_fallback_tokenizer()
    return AutoTokenizer.from_pretrained(tiny_model)


def test_the_byte_fallback_tokenizer_spells_a_character_outside_its_vocabulary_in_bytes() -> None:
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode("a中b", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581a", "<0xE4>", "<0xB8>", "<0xAD>", "b"]
    assert tokenizer.decode(ids) == "a中b" and tokenizer.decode(ids[:3]) == "a\ufffd\ufffd"


def _byte_token(byte: int) -> str:
    """How a byte-level BPE spells one byte (GPT-2's map: printable bytes as themselves, the rest from 256)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(byte))


def _ids(tokenizer: PreTrainedTokenizerBase, data: bytes) -> list[int]:
    """One token per byte: byte-level's characters, or (byte fallback) a letter's piece if there is one and
    a `<0xHH>` token otherwise (the decoder makes a run of byte tokens U+FFFD per byte if it is broken)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(chr(b) if chr(b) in vocab and b < 0x80 else f"<0x{b:02X}>", vocab.get(_byte_token(b)))
           for b in data]
    assert None not in ids
    assert tokenizer.decode(ids).rstrip("\ufffd") == data.decode("utf-8", "replace").rstrip("\ufffd")
    return ids


def _run(tokenizer: PreTrainedTokenizerBase, ids: list[int], max_tokens: int, is_streamed: bool = True,
         stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
         ) -> tuple[list[StreamDelta], RequestOutput]:
    """Append `ids` one step at a time as the engine does (the tokenizer's EOS ends it); the stream's deltas
    and the output."""
    outputs = OutputProcessor(tokenizer, frozenset({tokenizer.eos_token_id}), max_model_len=1_000)
    params = SamplingParams(max_tokens=max_tokens, logprobs=0, stop=stop, stop_token_ids=stop_token_ids)
    seq = Sequence("r", [1, 2], params, None, 0)
    return step_through(outputs, seq, ids, is_streamed), seq.to_output()


def step_through(outputs: Any, seq: Sequence, ids: list[int], is_streamed: bool) -> list[StreamDelta]:
    """Append `ids` to `seq` one step at a time as the engine does, until `outputs` (an OutputProcessor, or
    one with its check_stop/delta) finishes it; the stream's deltas (the whole answer's alone unstreamed)."""
    deltas = []
    for token in ids:
        seq.append(token, TokenLogprob(token, -0.5, ()))
        finished = outputs.check_stop(seq, is_streamed)
        delta = outputs.delta(seq) if is_streamed or finished else None
        if delta is not None:
            deltas.append(delta)
        if finished:
            break
    return deltas


def test_a_character_spelled_over_tokens_is_streamed_once_whole_with_its_tokens(
        tokenizer: PreTrainedTokenizerBase) -> None:
    ids = _ids(tokenizer, b"a" + MIDDLE + b"b")
    deltas, out = _run(tokenizer, ids, max_tokens=5)
    assert [d.text for d in deltas] == ["a", "中", "b"]
    assert [d.token_ids for d in deltas] == [ids[:1], ids[1:4], ids[4:]]
    assert [d.num_completion_tokens for d in deltas] == [1, 4, 5]
    assert [[lp.token_id for lp in d.logprobs or []] for d in deltas] == [d.token_ids for d in deltas]
    assert out.text == "a中b" and out.num_completion_tokens == 5


@pytest.mark.parametrize("is_streamed", [True, False], ids=["streamed", "whole"])
def test_an_answer_cut_inside_a_character_ends_before_it_and_is_not_counted(
        tokenizer: PreTrainedTokenizerBase, is_streamed: bool) -> None:
    ids = _ids(tokenizer, b"a" + MIDDLE[:2])
    deltas, out = _run(tokenizer, ids, max_tokens=3, is_streamed=is_streamed)
    assert out.finish_reason == "length" and out.text == "a"
    assert out.num_completion_tokens == 1 and out.token_ids == ids[:1] and len(out.logprobs or []) == 1
    if is_streamed:
        assert "".join(d.text for d in deltas) == "a" and "\ufffd" not in "".join(d.text for d in deltas)
        assert deltas[-1].num_completion_tokens == 1
        assert sum(len(d.token_ids) for d in deltas) == 1


@pytest.mark.parametrize("is_streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("ender", ["eos", "stop_token"])
def test_an_answer_that_stops_inside_a_character_ends_before_it_and_is_not_counted(
        tokenizer: PreTrainedTokenizerBase, is_streamed: bool, ender: str) -> None:
    """Before, the end of text (or a stop token) right after half a character sent it as U+FFFD and
    charged its tokens. The tokens from the unfinished character on (the stop token with them: it ends
    nothing the payer can read) are left out, as when the answer is cut by its length."""
    stop_token = _ids(tokenizer, b"b")[0]
    ender_id = tokenizer.eos_token_id if ender == "eos" else stop_token
    ids = [*_ids(tokenizer, b"a" + MIDDLE[:2]), ender_id]
    deltas, out = _run(tokenizer, ids, max_tokens=10, is_streamed=is_streamed,
                       stop_token_ids=(stop_token,) if ender == "stop_token" else ())
    assert out.finish_reason == "stop" and out.text == "a"
    assert out.num_completion_tokens == 1 and out.token_ids == ids[:1] and len(out.logprobs or []) == 1
    assert "".join(d.text for d in deltas) == "a" and deltas[-1].num_completion_tokens == 1
    assert sum(len(d.token_ids) for d in deltas) == 1


def test_an_answer_that_stops_after_whole_characters_counts_its_stop_token(
        tokenizer: PreTrainedTokenizerBase) -> None:
    ids = [*_ids(tokenizer, b"a" + MIDDLE), tokenizer.eos_token_id]
    deltas, out = _run(tokenizer, ids, max_tokens=10)
    assert out.finish_reason == "stop" and out.text == "a中" == "".join(d.text for d in deltas)
    assert out.num_completion_tokens == 5 and out.token_ids == ids and deltas[-1].num_completion_tokens == 5


def test_bytes_that_start_no_character_stay_in_the_answer_and_only_the_unfinished_one_is_left_out(
        tokenizer: PreTrainedTokenizerBase) -> None:
    ids = _ids(tokenizer, b"a\xd7\xd7\xd7")  # a lead byte followed by another is broken; the last is unfinished
    deltas, out = _run(tokenizer, ids, max_tokens=4)
    assert out.text == "a\ufffd\ufffd" and out.num_completion_tokens == 3
    assert "".join(d.text for d in deltas) == out.text and deltas[-1].num_completion_tokens == 3


def test_a_replacement_character_the_model_wrote_whole_is_text_and_counted(
        tokenizer: PreTrainedTokenizerBase) -> None:
    ids = _ids(tokenizer, b"a" + "\ufffd".encode())
    deltas, out = _run(tokenizer, ids, max_tokens=4)
    assert out.text == "a\ufffd" == "".join(d.text for d in deltas) and out.num_completion_tokens == 4


def test_a_stop_string_is_never_streamed_even_in_part(tokenizer: PreTrainedTokenizerBase) -> None:
    """Before, "ab", "E", "N" went out, then the stop string's last letter ended the answer: the client
    had text the answer does not hold."""
    ids = _ids(tokenizer, b"abEND!")
    deltas, out = _run(tokenizer, ids, max_tokens=10, stop=("END",))
    assert "".join(d.text for d in deltas) == "ab" == out.text and out.finish_reason == "stop"
    assert [d.num_completion_tokens for d in deltas] == [1, 2, 2, 2, 5], "held back tokens wait with their text"
    assert [(d.held_text, d.num_held_tokens) for d in deltas] == [("", 0), ("", 0), ("E", 1), ("EN", 2), ("", 0)]
    ids = _ids(tokenizer, b"abENx")  # what looked like a stop string's start was not one
    deltas, out = _run(tokenizer, ids, max_tokens=5, stop=("END",))
    assert [d.text for d in deltas] == ["a", "b", "", "", "ENx"] and out.text == "abENx"
    assert [d.token_ids for d in deltas] == [ids[:1], ids[1:2], [], [], ids[2:]]


def test_a_stream_says_what_it_holds_back_so_a_client_that_leaves_is_charged_for_it(
        tokenizer: PreTrainedTokenizerBase) -> None:
    """Each delta says the whole characters generated and not sent yet (a stop string's possible start) and
    how many tokens spell them: sent and held back together are every token of whole characters, and an
    unfinished character is in neither. Before, a stream whose text was all held back told nobody anything:
    its client could hang up uncharged, and send the voucher again."""
    ids = _ids(tokenizer, b"ab" + MIDDLE[:2])  # "b" may start the stop string; then half a character
    deltas, _ = _run(tokenizer, ids, max_tokens=10, stop=("b\u4e2d!",))
    assert [(d.text, d.held_text, d.num_held_tokens) for d in deltas] == [("a", "", 0), ("", "b", 1)]
    sent = sum(len(d.token_ids) for d in deltas)
    assert sent + deltas[-1].num_held_tokens == 2, "the unfinished character's tokens are neither sent nor held"
    assert [lp.token_id for lp in deltas[-1].held_logprobs or []] == ids[1:2], "the held token's logprob with it"
    deltas, out = _run(tokenizer, _ids(tokenizer, b"bEN"), max_tokens=3, stop=("END",))  # cut by its length
    assert [(d.text, d.held_text, d.num_held_tokens) for d in deltas] == [("b", "", 0), ("", "E", 1), ("EN", "", 0)]
    assert out.text == "bEN" and out.num_completion_tokens == 3, "what was held goes out with the last delta"


@pytest.mark.parametrize("is_streamed", [True, False], ids=["streamed", "whole"])
def test_a_stop_string_right_after_half_a_character_leaves_no_replacement_character(
        tokenizer: PreTrainedTokenizerBase, is_streamed: bool) -> None:
    """The answer is what comes before its stop string, and its bytes end inside a character: that character
    is left out, as when an answer ends inside one any other way. Before, the stop string's first byte made
    the unfinished bytes broken ones, and the answer (and the stream, before the stop string was whole) had
    a U+FFFD standing for bytes of no character the payer got. The tokens are all counted, those of the
    stop string with them: they were generated, as every stop string's are (rule: text never shows what
    is not a character of the answer; the count is every token generated up to the stop string's end)."""
    ids = [*_ids(tokenizer, b"a" + MIDDLE[:2]), *_ids(tokenizer, b"bba")]
    deltas, out = _run(tokenizer, ids, max_tokens=10, is_streamed=is_streamed, stop=("bb",))
    assert out.finish_reason == "stop" and out.text == "a"
    assert out.num_completion_tokens == 5 and out.token_ids == ids[:5]
    if is_streamed:
        assert "".join(d.text for d in deltas) == "a" and deltas[-1].num_completion_tokens == 5
    ids = [*_ids(tokenizer, b"a" + MIDDLE[:2]), *_ids(tokenizer, b"ba")]  # not the stop string: broken bytes
    deltas, out = _run(tokenizer, ids, max_tokens=5, stop=("bb",))
    assert out.text.startswith("a\ufffd") and out.text.endswith("\ufffdba") and out.num_completion_tokens == 5
    assert "".join(d.text for d in deltas) == out.text


def test_a_huge_stop_string_holds_back_a_bounded_start_and_costs_a_step_little(
        tokenizer: PreTrainedTokenizerBase) -> None:
    """A payer's stop string of 100,000 "a"s must not make each step of everyone's batch slow."""
    ids = _ids(tokenizer, b"a" * 200)
    started = time.perf_counter()
    deltas, out = _run(tokenizer, ids, max_tokens=200, stop=("a" * 100_000,))
    assert time.perf_counter() - started < 2.0
    before_last = "".join(d.text for d in deltas[:-1])  # sent by the step before the last (199 "a"s made)
    assert out.text == "a" * 200 and len(before_last) == 199 - MAX_HELD_CHARS


def test_an_aborted_answer_without_stop_strings_has_the_text_of_its_tokens(tiny_model: Path) -> None:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=128))
    done: list[RequestOutput] = []
    engine.add_request("The river runs", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                       request_id="cut", waiter=done.append)
    for _ in range(6):
        engine.step()
    engine.abort("cut")
    while not done:
        engine.step()
    (out,) = done
    assert out.finish_reason == "abort" and out.num_completion_tokens >= 5
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True) != ""
