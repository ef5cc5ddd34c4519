"""Tiny models, tokenizers and adapters made on the spot, for the demo, the tests and the benchmarks."""

from node.devkit.tiny_adapter import ALL_TARGETS, TrainedAdapter, train_tiny_adapter
from node.devkit.tiny_model import make_tiny_model, train_tokenizer

__all__ = ["ALL_TARGETS", "TrainedAdapter", "make_tiny_model", "train_tiny_adapter", "train_tokenizer"]
