"""The UTF-8 automaton that keeps constrained outputs decodable agrees with Python's decoder."""

from __future__ import annotations

import codecs

from hypothesis import given
from hypothesis import strategies as st

from node.engine.utf8_tokens import REJECT, START, Utf8Tokens, num_unfinished, step


def _unfinished_end(data: bytes) -> bytes | None:
    """The end of `data` that Python's decoder waits on for more bytes (None: data is not valid UTF-8)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return decoder.getstate()[0]


def _is_valid_prefix(data: bytes) -> bool:
    """Python's decoder takes data or a continuation of it. It waits on the start of a surrogate (ED A0..BF)
    as if it could become a character (CPython 3.11): such an end is valid only if some bytes finish it."""
    end = _unfinished_end(data)
    if not end:
        return end is not None
    need = (2 if end[0] < 0xE0 else 3 if end[0] < 0xF0 else 4) - len(end)
    return any(_unfinished_end(end + bytes([fill]) * need) == b"" for fill in (0x80, 0xBF))


# lead and continuation bytes around the edges of each range, so that invalid forms come up often
_BYTES = st.sampled_from([0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0,
                          0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF])


@given(st.lists(_BYTES, max_size=8).map(bytes))
def test_a_byte_string_is_taken_exactly_when_python_decodes_it_or_a_continuation_of_it(data: bytes) -> None:
    state = step(START, data)
    assert (state != REJECT) == _is_valid_prefix(data)
    if state == START:
        data.decode("utf-8")


def _is_unfinished_character(data: bytes) -> bool:
    return _unfinished_end(data) == data != b"" and _is_valid_prefix(data)


@given(st.lists(_BYTES, max_size=8).map(bytes))
def test_the_unfinished_end_of_bytes_is_the_one_python_waits_for_more_bytes_to_decode(data: bytes) -> None:
    """Bytes that can never become a character (a lead byte before another, a surrogate) are no unfinished end."""
    expected = next((n for n in range(1, 4) if n <= len(data) and _is_unfinished_character(data[-n:])), 0)
    assert num_unfinished(data) == expected


@given(st.lists(st.lists(_BYTES, min_size=1, max_size=3).map(bytes), min_size=1, max_size=6))
def test_tokens_taken_one_by_one_spell_valid_utf8_and_the_stop_token_only_ends_whole_characters(
        tokens: list[bytes]) -> None:
    vocab = [b"", *dict.fromkeys(tokens)]  # token 0 is the stop token
    table = Utf8Tokens(vocab, stop_token_ids=[0])
    state, written = START, b""
    for data in tokens:
        token_id = vocab.index(data)
        allowed = bool((int(table.masks[state, token_id // 32]) >> (token_id % 32)) & 1)
        assert allowed == (table.next_state[state][token_id] != REJECT) == _is_valid_prefix(written + data)
        if not allowed:
            break
        state, written = table.next_state[state][token_id], written + data
    stop_allowed = bool(int(table.masks[state, 0]) & 1)
    assert stop_allowed == (state == START)
    if stop_allowed:
        written.decode("utf-8")
