"""The inference engine: paged KV cache, continuous batching, mixed-adapter LoRA.

Imports torch and nothing of the service.
"""
