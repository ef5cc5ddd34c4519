"""loranode: serve thousands of LoRA adapters on one base model and pay the data behind them."""

__version__ = "0.1.0"
