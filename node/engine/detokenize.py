"""Incremental detokenisation: a step decodes a window of a sequence's last tokens, never its whole output.

Decoding the whole output on every step (to find stop strings, to stream) cost a step thread the square
of the answer's length: 11.6 s of decoding over one 8,000-token stream on the tiny tokenizer, priced
linearly. Here the text is made in pieces that never change once made (`IncrementalText.text`, what the
first `read` tokens spell), each the difference of two decodes of a small window:

    decode(context + new)[len(decode(context)):]

The context (the tokens of the piece before) is decoded with the new tokens because a token's text can
depend on its neighbour: sentencepiece's decoder strips the space of the text's first `▁`, so the new
tokens alone would lose their leading space, and the context keeps the same first character in both
decodes (it is a piece that spelled some text, special tokens left out: they spell nothing). A piece ends
only where the tokens end between characters (`unfinished_tail`): the tokens of an unfinished character
(a byte-level or byte-fallback tokenizer spells one over up to 4 tokens) wait for the rest of it, and
meanwhile spell what decoding the whole output would have shown there (U+FFFD).

One decoder is not local: sentencepiece's byte fallback decodes a run of `<0xHH>` tokens together, and a
run that is not valid UTF-8 becomes one U+FFFD per byte, characters it spelled before included. So with a
byte-fallback tokenizer a run's UTF-8 state is followed (utf8_tokens' automaton): the byte that breaks it
makes the run's text U+FFFD per byte (the text is rewritten from where the run began, as the whole
output's decoding would have it; the stream has sent what it had, as before), and later bytes of a broken
run are U+FFFD each without decoding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from node.engine.token_bytes import BYTE_OF_PIECE, TokenBytes
from node.engine.utf8_tokens import REJECT, START, num_unfinished, step

MAX_CONTEXT = 64  # tokens of context at most (only tokens that spell no text make it grow past one piece)


@dataclass
class IncrementalText:
    """One sequence's text so far (kept on the sequence)."""

    text: str = ""  # what output_token_ids[:read] spell: final
    read: int = 0  # its tokens; they end between characters
    context: list[int] = field(default_factory=list)  # the last piece's tokens (no special ones)
    searched: int = 0  # characters of `text` in which no stop string ends (output.py)
    run_chars: int = -1  # byte fallback: where the open run of byte tokens begins in `text` (-1: none open)
    run_len: int = 0  # its bytes
    run_state: int = START  # its UTF-8 state (REJECT: broken)


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, token_bytes: TokenBytes) -> None:
        self.tokenizer, self.token_bytes = tokenizer, token_bytes
        self.special = frozenset(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        self.byte_tokens = frozenset(vocab[p] for p in BYTE_OF_PIECE) if token_bytes.is_byte_fallback else frozenset()

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one list of ids decodes to one text (typed str | list[str] for batches)
        return text

    def advance(self, state: IncrementalText, ids: list[int], end: int) -> str:
        """The text of ids[:end] (which must end between characters, and hold the tokens read so far)."""
        if end <= state.read:
            return state.text
        new = [t for t in ids[state.read:end] if t not in self.special]  # the decoder leaves them out first
        state.read = end
        if not self.byte_tokens:
            self._append(state, new)
            return state.text
        for is_bytes, group in itertools.groupby(new, key=self.byte_tokens.__contains__):
            if is_bytes:
                self._append_bytes(state, list(group))
            else:
                state.run_chars = -1  # a piece ends the run
                self._append(state, list(group))
        return state.text

    def _append(self, state: IncrementalText, new: list[int]) -> None:
        if not new:
            return
        before = self.decode(state.context) if state.context else ""
        piece = self.decode(state.context + new)[len(before):]
        state.text += piece
        state.context = new if piece else (state.context + new)[-MAX_CONTEXT:]

    def _append_bytes(self, state: IncrementalText, new: list[int]) -> None:
        """Byte tokens that end between characters or break their run (an unfinished character's bytes that a
        piece, the next tokens, ends: advance only reads up to where the tokens end between characters)."""
        if state.run_chars < 0:
            state.run_chars, state.run_len, state.run_state = len(state.text), 0, START
        data = b"".join(map(self.token_bytes, new))
        was_broken = state.run_state == REJECT
        state.run_state = REJECT if was_broken or step(state.run_state, data) != START else START
        state.run_len += len(data)
        if was_broken:
            state.text += "\ufffd" * len(data)
            state.context = new
        elif state.run_state == REJECT:  # these bytes broke the run: all of it is U+FFFD per byte
            state.text = state.text[:state.run_chars] + "\ufffd" * state.run_len
            state.searched = min(state.searched, state.run_chars)  # text that changed is searched again
            state.context = new
        else:
            self._append(state, new)

    def whole(self, state: IncrementalText, ids: list[int]) -> str:
        """The text of all `ids`, as decoding them together gives it: the final text of those that end
        between characters, then what the rest spells for now (U+FFFD for an unfinished character)."""
        text = self.advance(state, ids, len(ids) - self.unfinished_tail(ids))
        rest = [t for t in ids[state.read:] if t not in self.special]
        if not rest:
            return text
        if self.byte_tokens and all(t in self.byte_tokens for t in rest):  # an unfinished run: U+FFFD per byte
            run_chars, run_len = (state.run_chars, state.run_len) if state.run_chars >= 0 else (len(text), 0)
            state.searched = min(state.searched, run_chars)  # the run's text is not what it was: search it again
            return text[:run_chars] + "\ufffd" * (run_len + len(b"".join(map(self.token_bytes, rest))))
        before = self.decode(state.context) if state.context else ""
        return text + self.decode(state.context + rest)[len(before):]

    def unfinished_tail(self, ids: list[int], end: int | None = None) -> int:
        """How many of the last tokens of ids[:end] spell the start of a character not finished yet (0: none).
        A character takes at most 4 bytes, so only the last few tokens' bytes are read."""
        end = len(ids) if end is None else end
        spelled, sizes = b"", list[int]()
        for token in reversed(ids[max(end - 8, 0):end]):  # 8: a special token among them spells no byte
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
