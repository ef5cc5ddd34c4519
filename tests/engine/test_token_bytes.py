"""The bytes a token spells, for both ways of spelling a character over tokens and for special tokens."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from node.engine.token_bytes import TokenBytes
from tests.fixtures.tokenizers import byte_fallback_tokenizer

TEXT = "a 中b\n\u00e9"


def test_byte_level_tokens_spell_the_bytes_of_the_text(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert b"".join(map(token_bytes, ids)) == TEXT.encode() and not token_bytes.is_byte_fallback
    assert token_bytes(tokenizer.eos_token_id) == b""


def test_byte_fallback_tokens_spell_a_byte_each_and_pieces_their_text() -> None:
    tokenizer = byte_fallback_tokenizer()
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert [token_bytes(t) for t in ids[:5]] == [b" a", b" ", b"\xe4", b"\xb8", b"\xad"]
    assert b"".join(map(token_bytes, ids)) == b" " + TEXT.encode()  # sentencepiece puts a space first
    assert token_bytes.is_byte_fallback and token_bytes(tokenizer.eos_token_id) == b""
