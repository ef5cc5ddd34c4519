"""The FastAPI app: OpenAI-compatible paid inference, receipts, quotes, channels."""
