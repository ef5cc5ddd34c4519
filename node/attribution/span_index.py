"""A suffix array over a dataset's token ids (infini-gram style): how often a span of tokens occurs in
the dataset, and the longest prefix of an output, from each of its positions, found in it.

The token stream is every text of the dataset tokenized (see `token_rule.py`), each followed by
SEPARATOR, a value no tokenizer emits, so that no match ever crosses from one text into the next.
`suffixes` holds every position of the stream, sorted by the suffix that starts there, so the
suffixes that begin with a span form one contiguous range, found by binary search.

Queries are answered for all positions of an output at once: each binary search step compares a
[positions, columns] block of the stream with the output, a few columns at a time (most comparisons
are decided by the first few tokens), so a 256-token output costs about 3 x log2(N) numpy steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

QUERY_END = -1  # an output's padding past its end: below every token, so a prefix sorts first
STREAM_END = -2  # the stream's padding past its end: below the output's padding
CHUNK_COLUMNS = 16


@dataclass(frozen=True)
class Match:
    length: int  # tokens of output[start:] found in the dataset (0: not even the first token)
    count: int  # how often output[start:start + length] occurs (0 when length is 0)


def separator_for(vocab_size: int) -> tuple[np.dtype[np.unsignedinteger], int]:
    """The token dtype for a vocabulary and its separator (the dtype's largest value, never a token)."""
    dtype = np.dtype(np.uint16) if vocab_size < np.iinfo(np.uint16).max else np.dtype(np.uint32)
    return dtype, int(np.iinfo(dtype).max)


def build_suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Positions of `tokens` sorted by their suffixes (libdivsufsort; int32 below 2**31 tokens)."""
    from pydivsufsort import divsufsort

    if tokens.size == 0:
        return np.zeros(0, dtype=np.int32)
    # divsufsort sorts bytes: big-endian token bytes compare like the tokens, and the suffixes at
    # token boundaries (even byte offsets for uint16) keep their relative order.
    width = tokens.dtype.itemsize
    raw = np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder(">"))).view(np.uint8)
    byte_suffixes: np.ndarray = divsufsort(raw)  # int32 or int64 byte offsets
    suffixes: np.ndarray = byte_suffixes[byte_suffixes % width == 0] // width
    return suffixes.astype(np.int32 if tokens.size < 2**31 else np.int64)


class SpanIndex:
    """Count and longest-match queries over `tokens` (the stream) and `suffixes` (its suffix array);
    both may be memory-mapped."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray) -> None:
        assert tokens.shape == suffixes.shape, "one suffix per stream position"
        self.tokens = tokens
        self.suffixes = suffixes

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    # --- single queries ---------------------------------------------------------------------------
    def count(self, span: Sequence[int]) -> int:
        """How many times `span` occurs in the dataset (within one text)."""
        if len(span) == 0:
            return self.num_tokens
        query = np.asarray(span, dtype=np.int64)
        return int(self.counts(query, np.zeros(1, np.int64), np.array([len(span)]))[0])

    def longest_match(self, tokens: Sequence[int], start: int) -> Match:
        """The longest prefix of tokens[start:] found in the dataset, and how often it occurs."""
        query = np.asarray(tokens, dtype=np.int64)
        length = int(self.longest_matches(query)[start])
        count = int(self.counts(query, np.array([start]), np.array([length]))[0]) if length else 0
        return Match(length, count)

    # --- batched queries --------------------------------------------------------------------------
    def longest_matches(self, query: np.ndarray) -> np.ndarray:
        """For each start i: the length of the longest prefix of query[i:] that occurs in the dataset.
        It is the longer common prefix of query[i:] with the two suffixes around its insertion point."""
        n = int(query.shape[0])
        if n == 0 or self.num_tokens == 0:
            return np.zeros(n, dtype=np.int64)
        starts = np.arange(n, dtype=np.int64)
        lengths = n - starts  # the whole rest of the output
        point = self._lower_bound(query, starts, lengths, strict=False)
        best = np.zeros(n, dtype=np.int64)
        for neighbour in (point - 1, point):
            ok = (neighbour >= 0) & (neighbour < self.num_tokens)
            rows = np.flatnonzero(ok)
            positions = self.suffixes[neighbour[rows]].astype(np.int64)
            best[rows] = np.maximum(best[rows], self._common_prefix(positions, query, starts[rows], lengths[rows]))
        return best

    def counts(self, query: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Occurrences of each span query[start:start + length] (the width of its suffix range)."""
        starts, lengths = starts.astype(np.int64), lengths.astype(np.int64)
        first = self._lower_bound(query, starts, lengths, strict=False)
        after = self._lower_bound(query, starts, lengths, strict=True)
        widths: np.ndarray = after - first
        return widths

    # --- binary search ----------------------------------------------------------------------------
    def _lower_bound(self, query: np.ndarray, starts: np.ndarray, lengths: np.ndarray, *, strict: bool) -> np.ndarray:
        """Per span: the first suffix-array index whose suffix, cut to the span's length, is >= the
        span (> the span when `strict`)."""
        lo = np.zeros(starts.shape[0], dtype=np.int64)
        hi = np.full(starts.shape[0], self.num_tokens, dtype=np.int64)
        active = np.flatnonzero(lo < hi)
        while active.size:
            mid = (lo[active] + hi[active]) // 2
            sign = self._compare(self.suffixes[mid].astype(np.int64), query, starts[active], lengths[active])
            below = sign <= 0 if strict else sign < 0  # the suffix sorts before the bound
            lo[active[below]] = mid[below] + 1
            hi[active[~below]] = mid[~below]
            active = active[lo[active] < hi[active]]
        return lo

    def _stream_at(self, at: np.ndarray) -> np.ndarray:
        """The stream's tokens at `at` (any shape), STREAM_END past its end."""
        return np.where(at < self.num_tokens, self.tokens[np.minimum(at, self.num_tokens - 1)], STREAM_END
                        ).astype(np.int64)

    @staticmethod
    def _query_at(query: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The output's tokens at `at` (any shape), QUERY_END past its end."""
        return np.where(at < query.shape[0], query[np.minimum(at, query.shape[0] - 1)], QUERY_END)

    def _columns(self, positions: np.ndarray, query: np.ndarray, starts: np.ndarray, offset: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columns [offset, offset + CHUNK) of the stream at `positions` and of the output at `starts`."""
        cols = np.arange(offset, offset + CHUNK_COLUMNS, dtype=np.int64)
        stream = self._stream_at(positions[:, None] + cols)  # [rows, CHUNK]
        out = self._query_at(query, starts[:, None] + cols)  # [rows, CHUNK]
        return cols, stream, out

    def _compare(self, positions: np.ndarray, query: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                 ) -> np.ndarray:
        """sign(stream[position:][:length] - query[start:][:length]) lexicographically, per row: the
        order of the first token where they differ within `length`, 0 where they agree that far."""
        common = self._common_prefix(positions, query, starts, lengths)
        a, b = self._stream_at(positions + common), self._query_at(query, starts + common)
        return np.where(common < lengths, np.where(a < b, -1, 1), 0).astype(np.int8)

    def _common_prefix(self, positions: np.ndarray, query: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                       ) -> np.ndarray:
        """Length of the common prefix of stream[position:] and query[start:start + length], per row."""
        common = np.zeros(positions.shape[0], dtype=np.int64)
        rows = np.arange(positions.shape[0])
        offset = 0
        while rows.size:
            cols, stream, out = self._columns(positions[rows], query, starts[rows], offset)
            differs = (stream != out) | (cols >= lengths[rows, None])  # [rows, CHUNK]
            decided = differs.any(axis=1)
            common[rows] = offset + np.where(decided, differs.argmax(axis=1), CHUNK_COLUMNS)
            offset += CHUNK_COLUMNS
            rows = rows[~decided]
        return common
