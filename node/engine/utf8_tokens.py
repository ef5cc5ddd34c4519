"""Which tokens keep a constrained output valid UTF-8, given the bytes written so far.

xgrammar 0.2.9 reads a JSON string's characters as UTF-8 but takes the surrogates U+D800..U+DFFF
(bytes ED A0..BF 80..BF) for characters: a byte-level tokenizer can spell them one byte per token,
and they decode to three U+FFFD each, so "2" plus one of them passed a maxLength of 2 as 4
characters. A grammar's sequence therefore also tracks where it stands inside a UTF-8 character
(a state of the standard UTF-8 automaton) and keeps only the tokens whose bytes continue valid
UTF-8 from there; the stop tokens only between characters. `num_unfinished` finds where an output's
bytes stop inside a character (output.py holds those tokens back, or leaves them out of the answer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# States: 0 between characters; the others inside one, named by the bytes still to come.
START, NEED1, NEED2, NEED3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4 = range(8)
NUM_STATES = 8
REJECT = 255
# inside a character: the range of the next byte and the state after it
_INSIDE = {NEED1: (0x80, 0xBF, START), NEED2: (0x80, 0xBF, NEED1), NEED3: (0x80, 0xBF, NEED2),
           AFTER_E0: (0xA0, 0xBF, NEED1),  # no overlong 3-byte forms
           AFTER_ED: (0x80, 0x9F, NEED1),  # no surrogates
           AFTER_F0: (0x90, 0xBF, NEED2),  # no overlong 4-byte forms
           AFTER_F4: (0x80, 0x8F, NEED2)}  # nothing above U+10FFFF


def _lead(byte: int) -> int:
    if byte < 0x80:
        return START
    if 0xC2 <= byte <= 0xDF:
        return NEED1
    if byte == 0xE0:
        return AFTER_E0
    if byte == 0xED:
        return AFTER_ED
    if 0xE1 <= byte <= 0xEF:
        return NEED2
    if byte == 0xF0:
        return AFTER_F0
    if 0xF1 <= byte <= 0xF3:
        return NEED3
    if byte == 0xF4:
        return AFTER_F4
    return REJECT  # a continuation byte, C0, C1 or F5..FF


def step(state: int, data: bytes) -> int:
    """The state after `data` from `state`, REJECT if `data` breaks UTF-8 there."""
    for byte in data:
        if state == START:
            state = _lead(byte)
        else:
            lo, hi, after = _INSIDE[state]
            state = after if lo <= byte <= hi else REJECT
        if state == REJECT:
            return REJECT
    return state


def num_unfinished(data: bytes) -> int:
    """How many of the last bytes of `data` begin a character not finished yet (0: it ends between
    characters, or in bytes that can never become one: a continuation without its lead, a surrogate)."""
    for n in range(1, min(3, len(data)) + 1):
        if not 0x80 <= data[-n] <= 0xBF:  # the last byte that is no continuation: where the last character starts
            return n if step(START, data[-n:]) not in (START, REJECT) else 0
    return 0


def bitmask_of(allowed: torch.Tensor) -> torch.Tensor:
    """[ceil(n / 32)] int32 bitmask (bit j of word w is token 32 * w + j) of a [n] bool tensor."""
    padded = torch.zeros(-(-len(allowed) // 32) * 32, dtype=torch.bool)
    padded[:len(allowed)] = allowed
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32)
    words = (padded.view(-1, 32).long() * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class Utf8Tokens:
    """Per UTF-8 state, the tokens allowed next (a bitmask) and the state each one leads to."""

    def __init__(self, spelled: Sequence[bytes], stop_token_ids: list[int]) -> None:
        vocab_size = len(spelled)
        self.next_state = [bytearray([REJECT]) * vocab_size for _ in range(NUM_STATES)]
        for token_id, data in enumerate(spelled):
            if not data or data.isascii():  # the common case, fast: only valid between characters
                self.next_state[START][token_id] = START
                continue
            states = range(NUM_STATES) if 0x80 <= data[0] <= 0xBF else (START,)
            for state in states:
                self.next_state[state][token_id] = step(state, data)
        for token_id in stop_token_ids:  # the text must not end inside a character
            self.next_state[START][token_id] = START
        self.masks = torch.stack([bitmask_of(torch.tensor(list(row)) != REJECT) for row in self.next_state])
