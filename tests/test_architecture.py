"""The dependency rule of STYLE.md, read from the source: the engine side never imports the service."""

from __future__ import annotations

import ast
import re
from pathlib import Path

NODE = Path(__file__).resolve().parent.parent / "node"
ENGINE_SIDE = ("engine", "lora", "models", "training")
FORBIDDEN_THIRD_PARTY = {"fastapi", "starlette", "sqlalchemy", "alembic", "web3", "eth_account", "celery"}
FORBIDDEN_NODE = {"node.api", "node.db", "node.chain", "node.settlement"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            names.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.add(n.module)
    return names


def _violations(files: list[Path], forbidden_roots: set[str], forbidden_node: set[str]) -> list[str]:
    bad = []
    for f in files:
        for name in _imports(f):
            root = name.split(".")[0]
            if root in forbidden_roots or any(name == m or name.startswith(m + ".") for m in forbidden_node):
                bad.append(f"{f.relative_to(NODE.parent)} imports {name}")
    return bad


def test_engine_side_imports_nothing_of_the_service() -> None:
    files = [p for d in ENGINE_SIDE for p in (NODE / d).rglob("*.py")]
    assert files, "engine packages are missing"
    assert _violations(files, FORBIDDEN_THIRD_PARTY, FORBIDDEN_NODE) == []


# The composition roots: the processes that start an API (the CLI, and the local dev node the CLI's
# `dev` command, the demo and the end-to-end tests run) may import it; nothing else may.
ENTRY_POINTS = ("cli", "devkit/local_node.py")


def test_nothing_imports_the_api() -> None:
    files = [p for p in NODE.rglob("*.py")
             if p.relative_to(NODE).parts[0] != "api" and not str(p.relative_to(NODE)).startswith(ENTRY_POINTS)]
    assert _violations(files, set(), {"node.api"}) == []


# The typed objects of DESIGN.md (node/protocol/): pure values and hashing that every layer imports,
# so they import nothing of the service but its errors, and none of its frameworks.
PROTOCOL_MAY_IMPORT = ("node.errors", "node.protocol")


def _protocol_violations(files: list[Path]) -> list[str]:
    bad = _violations(files, FORBIDDEN_THIRD_PARTY, set())
    for f in files:
        bad += [f"{f.relative_to(NODE.parent)} imports {name}" for name in _imports(f)
                if name.split(".")[0] == "node" and not name.startswith(PROTOCOL_MAY_IMPORT)]
    return bad


def test_protocol_imports_nothing_of_the_service() -> None:
    files = list((NODE / "protocol").rglob("*.py"))
    assert files, "node/protocol is missing"
    assert _protocol_violations(files) == []


def test_engine_side_takes_only_the_pure_hex_helpers_of_the_protocol() -> None:
    """lora/ spells digests as 0x-hex with node/protocol/hexstr.py; the protocol's hashing and signing
    (eth_abi, coincurve) stay out of the engine's processes."""
    files = [p for d in ENGINE_SIDE for p in (NODE / d).rglob("*.py")]
    used = {name for f in files for name in _imports(f) if name.startswith("node.protocol")}
    assert used <= {"node.protocol.hexstr"}
    assert _protocol_violations([NODE / "protocol" / "hexstr.py"]) == []


def test_the_protocol_rule_catches_a_violation() -> None:
    bad = NODE / "protocol" / "_probe_violation.py"
    bad.write_text("import web3\nfrom node.db import models\nfrom node.errors import BadRequest\n")
    try:
        assert len(_protocol_violations([bad])) == 2
    finally:
        bad.unlink()


def test_routes_take_typed_dependencies_instead_of_reaching_through_services() -> None:
    """A route names what it uses (`ledger: LedgerDep`, node/api/deps.py), never `svc.payments.ledger`."""
    reaching = re.compile(r"\bsvc\.\w+\.")
    bad = [f"{p.relative_to(NODE.parent)}:{i}" for p in (NODE / "api" / "routes").glob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1) if reaching.search(line)]
    assert bad == []


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = NODE / "engine" / "_probe_violation.py"
    bad.write_text("import sqlalchemy\nfrom node.db import session\n")
    try:
        assert len(_violations([bad], FORBIDDEN_THIRD_PARTY, FORBIDDEN_NODE)) == 2
    finally:
        bad.unlink()
