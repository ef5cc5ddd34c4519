"""LoRA training on registered datasets that scales with them: tokenized once to a memory-mapped file
(`token_file`), packed into model-length sequences (`packing`), trained in mini-batches with gradient
accumulation (`lora_trainer`), checkpointed and resumable (`checkpoint`). `loranode adapter train` only
wires it. The package itself imports nothing heavy, so the CLI can name its defaults without torch."""

CHECKPOINT_DIR = "checkpoint"  # under the output folder
MAX_DEFAULT_SEQ_LEN = 2048  # the model's length up to this, unless a sequence length is given
