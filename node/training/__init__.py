"""LoRA training on registered datasets that scales with them: tokenized once to a memory-mapped file,
packed into model-length sequences, trained in mini-batches with gradient accumulation, checkpointed
and resumable. `loranode adapter train` only wires it."""

from node.training.checkpoint import CHECKPOINT_DIR
from node.training.lora_trainer import LoRATrainer, StepReport, TrainingConfig, TrainingObserver, TrainingResult
from node.training.packing import PackedSequences
from node.training.token_file import TokenFile, tokenize_datasets

__all__ = ["CHECKPOINT_DIR", "LoRATrainer", "PackedSequences", "StepReport", "TokenFile", "TrainingConfig",
           "TrainingObserver", "TrainingResult", "tokenize_datasets"]
