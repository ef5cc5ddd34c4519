"""`loranode attribution verify`: recompute a receipt's attribution from public data and say whether
the node told the truth (exit 0), or not (exit 1, one line saying what differs); 2 on errors."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from node.cli.console import console, err_console
from node.cli.context import DeploymentOption, RpcOption, chain_context
from node.errors import BadRequest, ConfigError

app = typer.Typer(help="Attribution evidence: check what a receipt says about the datasets.", no_args_is_help=True)
RECEIPT_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ChainRegistry:
    """The verifier's Registry: the registry contracts, read through the RPC."""

    contracts: Any

    def adapter_lineage_hash(self, adapter_id: int) -> bytes:
        return bytes(self.contracts.adapters.get(adapter_id).lineage_hash)

    def dataset(self, dataset_id: int) -> Any:
        from node.attribution.index_store import DatasetRef

        info = self.contracts.datasets.get(dataset_id)
        return DatasetRef(dataset_id, "0x" + info.content_hash.hex(), info.uri)


def _fetch(receipt: str, node_url: str) -> dict[str, Any]:
    import httpx

    try:
        resp = httpx.get(f"{node_url.rstrip('/')}/v1/receipts/{receipt}", timeout=30.0)
    except httpx.HTTPError as exc:
        raise BadRequest(f"cannot reach the node at {node_url}", reason=str(exc)) from exc
    if resp.status_code != 200:
        raise BadRequest(f"the node answered {resp.status_code} for receipt {receipt}", body=resp.text[:300])
    return dict(resp.json())


def load_receipt(receipt: str, node_url: str) -> tuple[dict[str, Any], str | None]:
    """The receipt (a node's GET /v1/receipts/{id}, a saved copy of it, or a saved response body) and
    the output text it carries, if any."""
    if RECEIPT_ID.match(receipt):
        data = _fetch(receipt, node_url)
    else:
        try:
            data = json.loads(Path(receipt).read_text())
        except (OSError, ValueError) as exc:
            raise BadRequest(f"{receipt} is neither a receipt id nor a readable JSON file", reason=str(exc)) from exc
    if isinstance(data, dict) and isinstance(data.get("receipt"), dict):  # a whole response body
        choice = (data.get("choices") or [{}])[0]
        text = choice["message"].get("content") if "message" in choice else choice.get("text")
        return data["receipt"], text
    if not isinstance(data, dict):
        raise BadRequest("the receipt JSON is not an object")
    return data, data.get("output")


@app.command()
def verify(
    receipt: str = typer.Argument(..., help="A receipt id (0x..., fetched from --node-url) or a receipt JSON file."),
    node_url: str = typer.Option("http://127.0.0.1:8000", "--node-url", help="The node that signed it."),
    output_file: Path = typer.Option(None, "--output-file", help="The output text, if the receipt lacks it."),
    model: Path = typer.Option(None, "--model", help="The node's base model folder, for its tokenizer "
                                                     "(default: LORANODE_MODEL_PATH)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where datasets and their indexes are kept."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption,
) -> None:
    """Recompute the receipt's evidence and weights from the registered datasets; exit 0 if its
    method and lineageHash are what the node should have signed, 1 if not."""
    from transformers import AutoTokenizer

    from node.attribution.index_store import IndexStore
    from node.attribution.verification import verify as verify_receipt
    from node.chain.eip712 import Domain
    from node.config import load_settings

    data, text = load_receipt(receipt, node_url)
    if output_file is not None:
        text = output_file.read_text(encoding="utf-8")
    if text is None:
        raise BadRequest("the receipt does not carry its output text: pass --output-file")
    model = model or load_settings().model_path
    if model is None:
        raise ConfigError("pass --model (the node's base model folder) or set LORANODE_MODEL_PATH")
    ctx = chain_context(rpc_url, deployment)
    root = cache_dir or Path(tempfile.gettempdir()) / "loranode-verify"
    store = IndexStore(root, AutoTokenizer.from_pretrained(str(model)))
    domain = Domain(ctx.deployment.chain_id, ctx.deployment.settlement)
    verdict = verify_receipt(data, text, ChainRegistry(ctx.contracts()), store, domain)
    (console if verdict.is_truthful else err_console).print(verdict.line, highlight=False, soft_wrap=True)
    if not verdict.is_truthful:
        raise typer.Exit(1)
