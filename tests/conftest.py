"""Shared fixtures live in tests/fixtures/, one module per concern, loaded here as plugins."""

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.database",
]
