"""docs/x402.md's agent snippet is code an agent can paste: it parses, every name it imports exists in
the installed `x402` SDK, and every SDK method it calls is one the SDK has (a renamed one fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from x402 import x402ClientSync
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme

from node.payment.x402.channel_check import NOT_FINAL, PREFIX
from node.payment.x402.gas_cover import GAS_NOT_COVERED

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


def test_the_agent_section_names_the_refusals_an_agent_meets_as_the_node_sends_them() -> None:
    """The 402 past the credit on deposits not final yet (send again later) and the refused gasless refund
    (charge more, or withdraw yourself): the snippet handles both, the text spells their codes as the node does."""
    text = (ROOT / "docs" / "x402.md").read_text()
    section = text[text.index("## Paying as an agent"):text.index("### By hand")]
    (code,) = AGENT.findall(section)
    assert "status_code == 402" in code and "except RuntimeError" in code
    for suffix in (NOT_FINAL, GAS_NOT_COVERED):
        assert suffix.removeprefix(PREFIX) in code and suffix in section, suffix
