"""Decoder families (Llama, Mistral, Qwen2/3, Phi-3 in llama.py; Gemma 2/3 in gemma.py) and the safetensors loader."""
