"""What a request may cost (the quote the voucher must cover) and what it did cost (the charge)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pricing:
    """Per-token prices in the escrow token's smallest unit. Integers only."""

    prompt_token_price: int
    completion_token_price: int
    min_fee: int = 0

    def __post_init__(self) -> None:
        if min(self.prompt_token_price, self.completion_token_price, self.min_fee) < 0:
            raise ValueError("prices cannot be negative")

    def fee(self, prompt_tokens: int, completion_tokens: int) -> int:
        return max(self.min_fee,
                   prompt_tokens * self.prompt_token_price + completion_tokens * self.completion_token_price)

    def max_fee(self, prompt_tokens: int, max_tokens: int, num_choices: int = 1) -> int:
        """The most a request can be charged: every allowed completion token of every choice produced
        (the prompt is read once for all its choices)."""
        return self.fee(prompt_tokens, max_tokens * num_choices)
