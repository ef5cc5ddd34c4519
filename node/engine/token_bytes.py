"""The bytes a token spells, for the two ways a tokenizer spells one character over several tokens:
byte-level BPE (GPT-2's map: each of the 256 bytes has a printable character; Llama 3, Qwen2) and
sentencepiece byte fallback (a character outside the vocabulary as one `<0xE4>` token per byte; Llama 2,
Mistral). Any other token spells whole characters, its text; a special token spells nothing (the answer's
text leaves special tokens out)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

BYTE_OF_PIECE = {f"<0x{b:02X}>": b for b in range(256)}  # byte fallback's tokens
METASPACE = "\u2581"  # sentencepiece's space


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map, reversed: the printable bytes stand for themselves, the others for U+0100 onward."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + i): b for i, b in enumerate(others)}


class TokenBytes:
    """`token_bytes(token_id)`: the bytes it spells (remembered; a few tokens are asked per step)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.is_byte_fallback = all(piece in vocab for piece in BYTE_OF_PIECE)
        alphabet = byte_level_alphabet()
        self._alphabet = alphabet if not self.is_byte_fallback and all(c in vocab for c in alphabet) else None
        self._special = frozenset(tokenizer.all_special_ids)
        self._known: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        data = self._known.get(token_id)
        if data is None:
            data = self._known[token_id] = self._spell(token_id)
        return data

    def _spell(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self._special or not isinstance(piece, str):  # a str for one id; None: no such token
            return b""
        if self.is_byte_fallback:
            if piece in BYTE_OF_PIECE:
                return bytes([BYTE_OF_PIECE[piece]])
            return piece.replace(METASPACE, " ").encode()
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        return piece.encode()  # an added token's own text, or a tokenizer that spells whole characters
