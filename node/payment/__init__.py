"""Paying per request: the X-Payment wire format, prices, voucher checks and the lane ledger."""
