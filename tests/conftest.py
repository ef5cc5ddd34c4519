"""Shared fixtures live in tests/fixtures/, one module per concern, loaded here as plugins."""

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.database",
    "tests.fixtures.contracts",
    "tests.fixtures.indexer",
    "tests.fixtures.flaky_rpc",
    "tests.fixtures.models",
    "tests.fixtures.paid_node",
    "tests.fixtures.settlement",
]
