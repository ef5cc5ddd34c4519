"""The typed objects of DESIGN.md, each in one module that owns all its forms: the signed `voucher`
(header, stored JSON, ABI tuple, database row), the node's `receipt` (response JSON, receipts-tree leaf,
database row), their EIP-712 hashing (`eip712`), addresses and hex strings (`address`, `hexstr`).

Pure values and hashing: payment, chain, settlement, api, client and attribution import it; it imports
nothing of the service but `node.errors` (tests/test_architecture.py holds it so).
"""
