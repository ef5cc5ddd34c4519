# Until tests/conftest.py lists "tests.fixtures.contracts" in pytest_plugins.
from tests.fixtures.contracts import chain_contracts, chain_deployment, roles  # noqa: F401
