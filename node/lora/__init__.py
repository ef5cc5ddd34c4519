"""LoRA adapters: PEFT folders to tensors, the tiered store, device slots and the batched ops."""
