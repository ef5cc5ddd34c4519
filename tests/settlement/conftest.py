"""Until the lead adds tests.fixtures.settlement to tests/conftest.py's plugins."""

from tests.fixtures.settlement import settlement_world, sqlite_world  # noqa: F401
