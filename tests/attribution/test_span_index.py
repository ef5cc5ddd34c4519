"""The span index against brute force: counts and longest matches on random token streams with
repeats, separators that no match crosses, and the suffix array against a plain sort."""

from __future__ import annotations

import numpy as np
import pytest

from node.attribution.span_index import SpanIndex, build_suffix_array, separator_for


def _stream(rng: np.random.Generator, vocab: int, sizes: list[int]) -> np.ndarray:
    dtype, sep = separator_for(vocab)
    parts = []
    for n in sizes:
        parts += [rng.integers(0, vocab, n).astype(dtype), np.array([sep], dtype)]
    return np.concatenate(parts)


def _occurrences(stream: list[int], span: list[int]) -> int:
    k = len(span)
    return sum(stream[i:i + k] == span for i in range(len(stream) - k + 1))


def _longest(stream: list[int], query: list[int], start: int) -> int:
    length = 0
    while start + length < len(query) and _occurrences(stream, query[start:start + length + 1]):
        length += 1
    return length


def test_suffix_array_sorts_every_suffix() -> None:
    tokens = _stream(np.random.default_rng(0), 5, [300, 200])
    suffixes = build_suffix_array(tokens)
    as_lists = tokens.tolist()
    assert suffixes.tolist() == sorted(range(len(as_lists)), key=lambda i: as_lists[i:])


@pytest.mark.parametrize("vocab", [3, 50, 70_000])
def test_counts_and_longest_matches_agree_with_brute_force(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    tokens = _stream(rng, vocab, [400, 50, 250])
    copied = tokens[30:55].astype(np.int64)  # a run the query shares with the stream
    query = np.concatenate([rng.integers(0, vocab, 7), copied, rng.integers(0, vocab, 9)])
    index = SpanIndex(tokens, build_suffix_array(tokens))
    stream, q = [int(t) for t in tokens], [int(t) for t in query]

    lengths = index.longest_matches(query)
    assert lengths.tolist() == [_longest(stream, q, i) for i in range(len(q))]
    assert lengths[7] >= 25  # the copied run is found whole
    starts = np.arange(len(q))
    counts = index.counts(query, starts, lengths)
    assert counts.tolist() == [_occurrences(stream, q[i:i + int(n)]) if n else len(stream)
                               for i, n in enumerate(lengths)]
    for start in (0, 7, 20):
        m = index.longest_match(q, start)
        expected_count = _occurrences(stream, q[start:start + m.length]) if m.length else 0
        assert (m.length, m.count) == (lengths[start], expected_count)


def test_a_match_never_crosses_from_one_text_into_the_next() -> None:
    dtype, sep = separator_for(100)
    tokens = np.array([1, 2, 3, sep, 4, 5, 6, sep], dtype=dtype)
    index = SpanIndex(tokens, build_suffix_array(tokens))
    assert index.count([3, 4]) == 0 and index.count([2, 3]) == 1 and index.count([5]) == 1
    assert index.longest_match([2, 3, 4, 5, 6], 0).length == 2
    assert index.longest_match([2, 3, 4, 5, 6], 2).length == 3
    assert index.longest_match([9, 9], 0) == index.longest_match([9], 0)
    assert index.longest_match([9], 0).count == 0


def test_an_empty_index_matches_nothing() -> None:
    index = SpanIndex(np.zeros(0, np.uint16), build_suffix_array(np.zeros(0, np.uint16)))
    assert index.longest_matches(np.array([1, 2, 3])).tolist() == [0, 0, 0]
    assert index.count([1]) == 0
