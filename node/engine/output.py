"""Stop conditions, detokenisation and stream deltas for finished and running sequences.

An answer only ever holds whole characters. A tokenizer can spell one character over up to 4 tokens
(byte-level BPE, or sentencepiece's byte fallback: token_bytes.py); a stream holds back the text and the
tokens (and their logprobs) of an unfinished character until it is whole, and an answer that ends inside
one (its length, an abort, or an end-of-text or stop token right after it) ends before it: those tokens
(and the stop token after them) are left out of its text and its count, so nobody is sent, or charged
for, a U+FFFD that stands for bytes they never got. Bytes that can never become a character (a lead byte
followed by another) are what the model wrote and stay; bytes that only a stop string's first byte breaks
are the unfinished end of the answer before it, left out of its text (their tokens are counted, as the
stop string's are). A stream holds back an end of its text that a stop string begins with, too (up to
MAX_HELD_CHARS of it), and says what it holds back (a client that hangs up is charged for it, and gets it
as the stored answer): a stop string is never sent, though the start of a longer one may be.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from node.engine.detokenize import Detokenizer
from node.engine.sequence import Sequence, StreamDelta
from node.engine.token_bytes import TokenBytes

MAX_HELD_CHARS = 32  # the most of a stop string's start a stream holds back (a longer one may show its start)


@dataclass
class _Sent:
    num_tokens: int = 0
    num_chars: int = 0
    num_held_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int], max_model_len: int):
        self.tokenizer, self.eos, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.token_bytes = TokenBytes(tokenizer)
        self.detok = Detokenizer(tokenizer, self.token_bytes)
        self._decode, self._unfinished_tail = self.detok.decode, self.detok.unfinished_tail
        self._sent: dict[str, _Sent] = {}

    def check_stop(self, seq: Sequence, is_streamed: bool) -> bool:
        """After a token was appended: finish the sequence if a stop condition holds; True if it did."""
        p, token = seq.params, seq.output_token_ids[-1]
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            self.cut(seq, num_stop_tokens=1)
            seq.finish("stop")
            return True
        if p.stop or is_streamed:
            seq.text = self.detok.whole(seq.detok, seq.output_token_ids)
            cut = self._stop_string_at(seq.text, p.stop, seq.stop_search_from, seq.detok.searched)
            if len(seq.output_token_ids) < p.min_tokens:  # no stop before min_tokens: search after this text
                seq.stop_search_from = max(0, len(seq.text) - max(map(len, p.stop), default=1) + 1)
                cut = None
            else:  # no stop string ends in the final text so far: the next step searches after it
                seq.detok.searched = len(seq.detok.text)
            if cut is not None:
                seq.text = self._before_stop(seq, cut)
                seq.finish("stop")
                return True
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.cut(seq)
            seq.finish("length")
            return True
        return False

    def cut(self, seq: Sequence, num_stop_tokens: int = 0) -> None:
        """A sequence ended before a stop string (its length, an abort, or its last `num_stop_tokens`: a stop
        token, whose text is left out): its text is what its tokens spell (a request neither streamed nor
        with stop strings is decoded at its end only), less an unfinished last character, whose tokens
        (and the stop token after them) are left out of the answer."""
        ids = seq.output_token_ids[:len(seq.output_token_ids) - num_stop_tokens]
        unfinished = self._unfinished_tail(ids)
        seq.num_cut_tokens = unfinished + num_stop_tokens if unfinished else 0
        end = len(ids) - unfinished
        seq.text = self.detok.advance(seq.detok, ids, end) if end >= seq.detok.read else self._decode(ids[:end])

    def _before_stop(self, seq: Sequence, cut: int) -> str:
        """The text before the stop string found at `cut`, less a character its bytes end inside: the stop
        string's first byte made those bytes broken (U+FFFD), but they are the unfinished end of the answer,
        left out as any answer's is (its tokens, generated before the stop string's, are still counted)."""
        text, ids = seq.text[:cut], seq.output_token_ids
        if not text.endswith("\ufffd"):
            return text
        num_before = self._tokens_before(ids, len(seq.text[cut:].encode()))
        unfinished = self._unfinished_tail(ids, num_before) if num_before is not None else 0
        if num_before is None or not unfinished:
            return text
        return text[:len(text) - self._num_chars(ids, num_before - unfinished, num_before)]  # its U+FFFDs

    def _tokens_before(self, ids: list[int], num_bytes: int) -> int | None:
        """How many first `ids` spell all but their last `num_bytes` bytes (None: a token spells across that
        boundary). Reads token bytes only (cached): a stop string of any length costs no decode."""
        num_spelled, k = 0, len(ids)
        while k > 0 and num_spelled < num_bytes:
            k -= 1
            num_spelled += len(self.token_bytes(ids[k]))
        return k if num_spelled == num_bytes else None

    @staticmethod
    def _stop_string_at(text: str, stops: tuple[str, ...], start: int, searched: int) -> int | None:
        """Where the first stop string in `text` from `start` begins; none ends in its first `searched`
        characters (already searched), so each is looked for only where it could end after them."""
        found = [i for i in (text.find(s, max(start, searched - len(s) + 1)) for s in stops if s) if i >= 0]
        return min(found) if found else None

    def delta(self, seq: Sequence) -> StreamDelta | None:
        """What the stream has not seen yet, and what it is held back from seeing; None when nothing changed
        and it is not finished."""
        sent = self._sent.setdefault(seq.request_id, _Sent())
        whole, num_whole, num_chars, num_tokens = self._ready(seq)
        num_tokens = max(num_tokens, sent.num_tokens)
        num_held = max(num_whole - num_tokens, 0)
        new_tokens = seq.output_token_ids[sent.num_tokens:num_tokens]
        asked = seq.params.logprobs is not None
        logprobs = seq.output_logprobs[sent.num_tokens:num_tokens] if asked else None
        new_text = whole[sent.num_chars:num_chars] if num_chars > sent.num_chars else ""
        if not new_tokens and not new_text and not seq.is_finished and num_held == sent.num_held_tokens:
            return None
        sent.num_tokens, sent.num_held_tokens = num_tokens, num_held
        sent.num_chars = max(sent.num_chars, num_chars)
        return StreamDelta(request_id=seq.request_id, token_ids=new_tokens, text=new_text,
                           finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_token_ids),
                           num_completion_tokens=num_tokens, error=seq.error, logprobs=logprobs,
                           held_text=whole[sent.num_chars:] if num_held else "", num_held_tokens=num_held,
                           held_logprobs=seq.output_logprobs[num_tokens:num_whole] if asked and num_held else None)

    def _ready(self, seq: Sequence) -> tuple[str, int, int, int]:
        """The whole characters generated and how many tokens spell them, then how many of those characters
        a stream may have now and their tokens: all of a finished sequence's; of a running one, the whole
        characters less an end that a stop string begins with (it may become one, and a stop string is never
        sent), held back with its tokens. An unfinished character is in neither (its tokens are not an
        answer's yet). Each is a few tokens' work: the text is decoded incrementally (detokenize.py)."""
        text, ids = seq.text, seq.output_token_ids
        if seq.is_finished:
            return text, seq.num_answer_tokens, len(text), seq.num_answer_tokens
        num_whole, unfinished = len(ids), self._unfinished_tail(ids)
        if unfinished:  # what the rest spells: a byte-fallback decoder makes a whole broken run of bytes U+FFFD
            num_whole -= unfinished
            text = self.detok.advance(seq.detok, ids, num_whole)
        held = _stop_prefix(text, seq.params.stop)
        if not held:
            return text, num_whole, len(text), num_whole
        num_ready = num_whole - self._tokens_ending(ids, num_whole, held)
        unfinished = self._unfinished_tail(ids, num_ready)  # bytes that the stop string's start broke
        if unfinished:  # the answer ends inside that character if it is the stop string: held back too
            num_ready -= unfinished
            return text, num_whole, len(text) - self._num_chars(ids, num_ready, num_whole), num_ready
        return text, num_whole, len(text) - held, num_ready

    def _tokens_ending(self, ids: list[int], end: int, num_chars: int) -> int:
        """How many of ids[:end] spell its last `num_chars` characters (a few tokens decoded)."""
        most = min(end, num_chars + 8)
        for m in range(1, most + 1):
            if self._num_chars(ids, end - m, end) >= num_chars:
                return m
        return most

    def _num_chars(self, ids: list[int], start: int, end: int) -> int:
        """How many characters ids[start:end] spell (a window: 4 tokens before them come with them, as it
        may start inside a character)."""
        window = ids[max(start - 4, 0):end]
        return len(self._decode(window)) - len(self._decode(window[:len(window) - (end - start)]))

    def forget(self, seq: Sequence) -> None:
        self._sent.pop(seq.request_id, None)


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text`, up to MAX_HELD_CHARS, that some stop string begins with
    (0: none). Only the places where a stop string holds the text's last character are tried."""
    if not text:
        return 0
    last, longest = text[-1], 0
    for stop in stops:
        j = stop.rfind(last, 0, min(len(stop) - 1, len(text), MAX_HELD_CHARS))  # stop[j] == last
        while j >= longest:  # the end of the text might be stop[:j + 1], longer than found so far
            if text.endswith(stop[:j + 1]):
                longest = j + 1
                break
            j = stop.rfind(last, 0, j)
    return longest
