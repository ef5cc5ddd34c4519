"""docs/x402.md's agent snippet is code an agent can paste: it parses, every name it imports exists in
the installed `x402` SDK, and every SDK method it calls is one the SDK has (a renamed one fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from x402 import x402ClientSync
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme

ROOT = Path(__file__).resolve().parents[1]
AGENT = re.compile(r"<!-- x402: agent[^>]*-->\s*```python\n(.*?)```", re.S)


def test_the_x402_agent_snippet_imports_and_calls_what_the_sdk_has() -> None:
    (code,) = AGENT.findall((ROOT / "docs" / "x402.md").read_text())
    tree = ast.parse(code)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert len(imports) == 6
    exec(compile(ast.Module(body=imports, type_ignores=[]), "x402.md", "exec"), {})
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"register", "set_spend_controls", "refund", "mount", "post"} <= called
    assert callable(x402ClientSync().register) and hasattr(x402ClientSync, "set_spend_controls")
    assert hasattr(BatchSettlementEvmScheme, "refund")
