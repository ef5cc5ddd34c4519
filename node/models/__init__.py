"""Llama-family decoders (Llama, Mistral, Qwen2) and the safetensors loader."""
