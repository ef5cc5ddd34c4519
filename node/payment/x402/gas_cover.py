"""The node's gasless transactions on a channel are paid for by that channel's fees (docs/x402.md, "Money rules").

The node submits a payer's deposits and sends its cooperative refunds, from its own gas key: without a rule
a payer could loop gasless deposit, one cheapest request, gasless refund of everything, again and again,
the node paying about 212k gas a cycle for one request's fee. Each channel counts the gas the node spent on
it (`x402_channels.node_gas`: its deposits as mined, its refunds at `REFUND_GAS` each). With the token's
worth in ETH set (`token_per_eth`, as the settlement prices gas: node/settlement/policy.py), a gasless
refund is granted only when what the channel was charged (all of it, so an honest payer's surplus carries
over to its next refund) covers that gas and this refund's, at the current gas price; else it is refused,
naming the payer's own way out (initiateWithdraw, then finalizeWithdraw after the withdraw delay, its own
gas) and how much more it would need to be charged. Without `token_per_eth` nothing is refused (the wiring
warns once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from node.payment.x402.channel_check import PREFIX, X402Refused

# a refund relayed by the gas key, claiming the charge first (claimWithSignature + refundWithSignature in one
# multicall): 141,307 gas measured on anvil for a channel's first claim, 103-107k after, 74k without a claim
# (tests/payment/x402/test_refund_gas.py); sent by the authorizer itself it is less
REFUND_GAS = 150_000
ETH = 10**18  # wei
GAS_NOT_COVERED = PREFIX + "refund_gas_not_covered"


@dataclass(frozen=True)
class GasCover:
    """What gas is worth in token units now: `token_per_eth` token units an ETH, `gas_price()` wei a gas."""

    token_per_eth: int
    gas_price: Callable[[], int]

    def worth(self, gas: int) -> int:
        """`gas` in token units at the current gas price, rounded up."""
        return -(-gas * int(self.gas_price()) * self.token_per_eth // ETH)

    def check_refund(self, charged: int, node_gas: int, withdraw_delay_s: int) -> None:
        """Refuse the gasless refund unless `charged` (the channel's charged total) covers `node_gas` (what
        the node spent on the channel so far) and this refund's gas."""
        gas = node_gas + REFUND_GAS
        cost = self.worth(gas)
        if charged >= cost:
            return
        raise X402Refused(
            f"a gasless refund needs the channel's fees to cover the node's gas on it: {gas} gas (its deposits, "
            f"refunds and this refund) is worth {cost} token units at the current gas price and the channel was "
            f"charged {charged}; {cost - charged} more charged would do, or withdraw yourself: initiateWithdraw, "
            f"then finalizeWithdraw after {withdraw_delay_s} s (your own gas)", GAS_NOT_COVERED,
            charged=str(charged), node_gas=str(gas), gas_cost=str(cost), short_by=str(cost - charged),
            withdraw_delay_s=withdraw_delay_s)
