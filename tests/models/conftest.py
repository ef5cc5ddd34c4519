"""Until tests/conftest.py lists it, load the tiny-model fixtures from here."""

from tests.fixtures.models import TinyAdapters, tiny_adapters, tiny_model

__all__ = ["TinyAdapters", "tiny_adapters", "tiny_model"]
