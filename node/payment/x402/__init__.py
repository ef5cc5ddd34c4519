"""x402 v2 `batch-settlement` on EVM, next to our lanes (docs/x402.md): the typed data, the wire, the
node's terms and the voucher checks. Written from the public specification; the SDKs are the clients
its tests run against."""
