"""loranode: serve thousands of LoRA adapters on one base model and pay the data behind them."""

import logging

__version__ = "0.1.0"


class _LibraryNoise(logging.Filter):
    """Drops two warnings that every import of peft prints (peft imports torchao) and that say nothing
    to a user: torchao failing to load its CUDA-only kernels on a machine that cannot run them, and torch
    deprecating the way torchao registers its enums. Everything else these loggers say still shows."""

    NOISE = ("Failed to load ", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.NOISE)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_LibraryNoise())
