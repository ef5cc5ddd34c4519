"""The output processor as it was before detokenisation became incremental: it decoded a sequence's whole
output on every step. Kept as the oracle that the incremental one must match, delta for delta."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from node.engine.sequence import Sequence, StreamDelta
from node.engine.token_bytes import TokenBytes
from node.engine.utf8_tokens import num_unfinished

MAX_HELD_CHARS = 32  # the most of a stop string's start a stream holds back (a longer one may show its start)


@dataclass
class _Sent:
    num_tokens: int = 0
    num_chars: int = 0
    num_held_tokens: int = 0


class ReferenceOutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int], max_model_len: int):
        self.tokenizer, self.eos, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.token_bytes = TokenBytes(tokenizer)
        self._sent: dict[str, _Sent] = {}

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one list of ids decodes to one text (typed str | list[str] for batches)
        return text

    def check_stop(self, seq: Sequence, is_streamed: bool) -> bool:
        """After a token was appended: finish the sequence if a stop condition holds; True if it did."""
        p, token = seq.params, seq.output_token_ids[-1]
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            self.cut(seq, num_stop_tokens=1)
            seq.finish("stop")
            return True
        if p.stop or is_streamed:
            seq.text = self._decode(seq.output_token_ids)
            cut = self._stop_string_at(seq.text, p.stop, seq.stop_search_from)
            if len(seq.output_token_ids) < p.min_tokens:  # no stop before min_tokens: search after this text
                seq.stop_search_from = max(0, len(seq.text) - max(map(len, p.stop), default=1) + 1)
                cut = None
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
        seq.text = self._decode(ids[:len(ids) - unfinished])

    def _before_stop(self, seq: Sequence, cut: int) -> str:
        """The text before the stop string found at `cut`, less a character its bytes end inside: the stop
        string's first byte made those bytes broken (U+FFFD), but they are the unfinished end of the answer,
        left out as any answer's is (its tokens, generated before the stop string's, are still counted)."""
        text, ids = seq.text[:cut], seq.output_token_ids
        if not text.endswith("\ufffd"):
            return text
        num_before = self._tokens_before(ids, len(seq.text[cut:].encode()))
        unfinished = self._unfinished_tail(ids[:num_before]) if num_before is not None else 0
        if num_before is None or not unfinished:
            return text
        window = ids[max(num_before - unfinished - 4, 0):num_before]  # a margin: it may start inside a character
        num_shown = len(self._decode(window)) - len(self._decode(window[:-unfinished]))  # its U+FFFDs
        return text[:len(text) - num_shown]

    def _tokens_before(self, ids: list[int], num_bytes: int) -> int | None:
        """How many first `ids` spell all but their last `num_bytes` bytes (None: a token spells across that
        boundary). Reads token bytes only (cached): a stop string of any length costs no decode."""
        num_spelled, k = 0, len(ids)
        while k > 0 and num_spelled < num_bytes:
            k -= 1
            num_spelled += len(self.token_bytes(ids[k]))
        return k if num_spelled == num_bytes else None

    def _unfinished_tail(self, ids: list[int]) -> int:
        """How many of the last tokens spell the start of a character not finished yet (0: none). A
        character takes at most 4 bytes, so only the last few tokens' bytes are read."""
        spelled, sizes = b"", list[int]()
        for token in reversed(ids[-8:]):  # 8: a special token among them spells no byte
            if len(spelled) >= 4:
                break
            data = self.token_bytes(token)
            spelled, sizes = data + spelled, [*sizes, len(data)]
        num_bytes, num_covered = num_unfinished(spelled), 0
        for k, size in enumerate(sizes, start=1):  # the fewest last tokens that hold those bytes
            num_covered += size
            if num_bytes and num_covered >= num_bytes:
                return k
        return 0

    @staticmethod
    def _stop_string_at(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
        found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
        return min(found) if found else None

    def delta(self, seq: Sequence) -> StreamDelta | None:
        """What the stream has not seen yet, and what it is held back from seeing; None when nothing changed
        and it is not finished."""
        sent = self._sent.setdefault(seq.request_id, _Sent())
        whole, num_whole, text, num_tokens = self._ready(seq)
        num_tokens = max(num_tokens, sent.num_tokens)
        num_held = max(num_whole - num_tokens, 0)
        new_tokens = seq.output_token_ids[sent.num_tokens:num_tokens]
        asked = seq.params.logprobs is not None
        logprobs = seq.output_logprobs[sent.num_tokens:num_tokens] if asked else None
        new_text = text[sent.num_chars:] if len(text) > sent.num_chars else ""
        if not new_tokens and not new_text and not seq.is_finished and num_held == sent.num_held_tokens:
            return None
        sent.num_tokens, sent.num_held_tokens = num_tokens, num_held
        sent.num_chars = max(sent.num_chars, len(text))
        return StreamDelta(request_id=seq.request_id, token_ids=new_tokens, text=new_text,
                           finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_token_ids),
                           num_completion_tokens=num_tokens, error=seq.error, logprobs=logprobs,
                           held_text=whole[sent.num_chars:] if num_held else "", num_held_tokens=num_held,
                           held_logprobs=seq.output_logprobs[num_tokens:num_whole] if asked and num_held else None)

    def _ready(self, seq: Sequence) -> tuple[str, int, str, int]:
        """The whole characters generated and how many tokens spell them, then the part of them a stream may
        have now and its tokens: all of a finished sequence; of a running one, the whole characters less an
        end that a stop string begins with (it may become one, and a stop string is never sent), held back
        with its tokens. An unfinished character is in neither (its tokens are not an answer's yet)."""
        text, ids = seq.text, seq.output_token_ids
        if seq.is_finished:
            return text, seq.num_answer_tokens, text, seq.num_answer_tokens
        num_whole, unfinished = len(ids), self._unfinished_tail(ids)
        if unfinished:  # what the rest spells: a byte-fallback decoder makes a whole broken run of bytes U+FFFD
            num_whole -= unfinished
            text = self._decode(ids[:num_whole])
        held = _stop_prefix(text, seq.params.stop)
        if not held:
            return text, num_whole, text, num_whole
        num_ready = num_whole - self._tokens_ending(ids[:num_whole], held)
        unfinished = self._unfinished_tail(ids[:num_ready])  # bytes that the stop string's start broke
        if unfinished:  # the answer ends inside that character if it is the stop string: held back too
            num_ready -= unfinished
            return text, num_whole, self._decode(ids[:num_ready]), num_ready
        return text, num_whole, text[:-held], num_ready

    def _tokens_ending(self, ids: list[int], num_chars: int) -> int:
        """How many of the last `ids` spell their last `num_chars` characters (a few tokens decoded)."""
        most = min(len(ids), num_chars + 8)
        for m in range(1, most + 1):
            window = ids[-(m + 4):]  # a margin before: a window may start inside a character
            if len(self._decode(window)) - len(self._decode(window[:-m])) >= num_chars:
                return m
        return most

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
