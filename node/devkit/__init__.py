"""Tiny models, tokenizers and adapters made on the spot, for the demo, the tests and the benchmarks."""
