"""`loranode attribution verify`: recompute a receipt's attribution from public data and the output
text, and say whether the node told the truth (exit 0), or not (exit 1, one line saying what
differs); 2 on errors. The text is its payer's: `--key-file` signs the read, `--output-file` gives a
copy; anyone else checks the signature, the hashes and the lineage."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from node.cli.console import console, err_console
from node.cli.context import DeploymentOption, NodeUrlOption, RpcOption, chain_context
from node.errors import BadRequest, ConfigError
from node.protocol.hexstr import to_hex

if TYPE_CHECKING:
    from node.protocol.eip712 import Domain

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
        return DatasetRef(dataset_id, to_hex(info.content_hash), info.uri)


def _fetch(receipt: str, node_url: str, read: str | None) -> dict[str, Any]:
    import httpx

    from node.chain.receipt_read import HEADER
    from node.client.refusal import check, reaching

    headers = {} if read is None else {HEADER: read}
    node_url = node_url.rstrip("/")
    with reaching(node_url):
        resp = httpx.get(f"{node_url}/v1/receipts/{receipt}", headers=headers, timeout=30.0)
    return dict(check(resp, node_url).json())


def read_authorization(key_file: Path | None, receipt: str, domain: Domain) -> str | None:
    """The X-Receipt-Read the payer's key (in `key_file`) signs for `receipt`; None without a key."""
    if key_file is None or not RECEIPT_ID.match(receipt):
        return None
    from eth_account import Account

    from node.chain.receipt_read import sign_read

    try:
        key = key_file.read_text(encoding="utf-8").strip()
        payer = str(Account.from_key(key).address)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key_file} does not hold a private key (0x and 64 hex digits)") from exc
    return sign_read(key, payer, receipt, domain)


def load_receipt(receipt: str, node_url: str, read: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The receipt (a node's GET /v1/receipts/{id}, with its text when `read` is its payer's signed
    X-Receipt-Read; a saved copy of it; or a saved response body) and the output text it carries, if any."""
    if RECEIPT_ID.match(receipt):
        data = _fetch(receipt, node_url, read)
    else:
        try:
            data = json.loads(Path(receipt).read_text())
        except (OSError, ValueError) as exc:
            raise BadRequest(f"{receipt} is neither a receipt id nor a readable JSON file", reason=str(exc)) from exc
    if isinstance(data, dict) and isinstance(data.get("receipt"), dict):  # a whole response body
        from node.protocol.receipt import response_output_text  # eth_abi and coincurve: 0.5 s to import

        return data["receipt"], response_output_text(data)
    if not isinstance(data, dict):
        raise BadRequest("the receipt JSON is not an object")
    return data, data.get("output")


@app.command()
def verify(
    receipt: str = typer.Argument(..., help="A receipt id (0x..., fetched from --node-url) or a receipt JSON file."),
    node_url: str = NodeUrlOption,
    output_file: Path = typer.Option(None, "--output-file", help="The output text (the payer's own copy)."),
    key_file: Path = typer.Option(None, "--key-file", help="The payer's private key: signs the read of a receipt "
                                                           "id's text (only its payer may read it)."),
    base_model: Path = typer.Option(None, "--base-model", help="The node's base model folder, for its tokenizer "
                                                               "(default: LORANODE_MODEL_PATH)."),
    model: Path = typer.Option(None, "--model", hidden=True, help="The old spelling of --base-model."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where datasets and their indexes are kept."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption,
) -> None:
    """Check what a receipt says about its datasets (exit 0 if true, 1 if not).

    Recomputes the receipt's evidence and weights from the registered datasets: its method and
    lineageHash must be what the node should have signed. Without the output text (the payer's:
    --key-file or --output-file) it checks the signature, the hashes and the lineage."""
    from transformers import AutoTokenizer

    from node.attribution.index_store import IndexStore
    from node.attribution.verification import verify as verify_receipt
    from node.config import load_settings
    from node.protocol.eip712 import Domain

    model_dir = base_model or model or load_settings().model_path
    if model_dir is None:
        raise ConfigError("pass --base-model (the node's base model folder) or set LORANODE_MODEL_PATH")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a model folder (no config.json): pass the node's base model folder "
                          "as --base-model", path=str(model_dir))
    ctx = chain_context(rpc_url, deployment)
    domain = Domain(ctx.deployment.chain_id, ctx.deployment.settlement)
    data, text = load_receipt(receipt, node_url, read_authorization(key_file, receipt, domain))
    if output_file is not None:
        text = output_file.read_text(encoding="utf-8")
    root = cache_dir or Path(tempfile.gettempdir()) / "loranode-verify"
    store = IndexStore(root, AutoTokenizer.from_pretrained(str(model_dir)))
    verdict = verify_receipt(data, text, ChainRegistry(ctx.contracts()), store, domain)
    (console if verdict.is_truthful else err_console).print(verdict.line, highlight=False, soft_wrap=True)
    if not verdict.is_truthful:
        raise typer.Exit(1)
