"""`loranode chain deploy`: the contracts, once per chain."""

from __future__ import annotations

from pathlib import Path

import typer

from node.cli.console import console
from node.cli.context import DevAccountOption, KeyFileOption, address, signing_key
from node.config import load_settings
from node.errors import Unavailable

app = typer.Typer(help="Deploy and inspect the loranode contracts.", no_args_is_help=True)


@app.command()
def deploy(
    rpc_url: str = typer.Option(..., "--rpc-url", help="JSON-RPC URL of the chain to deploy to."),
    out: Path = typer.Option(Path("deployments"), "--out", help="Folder for deployments/<chainId>.json."),
    guardian: str = typer.Option(None, callback=address,
                                 help="Address that may veto locked epochs (default: the deployer)."),
    treasury: str = typer.Option(None, callback=address,
                                 help="Address of the protocol's share (default: the deployer)."),
    protocol_bps: int = typer.Option(500, min=0, max=10_000, help="Protocol share of each fee, in bps."),
    node_bps: int = typer.Option(1_500, min=0, max=10_000, help="Node share of each fee, in bps."),
    thaw_period_s: int = typer.Option(86_400, min=1, help="Seconds a payer waits to withdraw (longer than the "
                                      "node's epoch max age plus its worst-case settle latency)."),
    challenge_period_s: int = typer.Option(3_600, min=0, help="Seconds an epoch stays locked (vetoable)."),
    token: str = typer.Option(None, callback=address, help="ERC-20 to pay in (default: deploy the demo token)."),
    key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Deploy DatasetRegistry, AdapterRegistry, PaymentEscrow and Settlement; write the addresses."""
    from eth_account import Account
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from web3 import Web3

    from node.chain.deploy import deploy_all, write_deployment

    try:
        chain_id = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10})).eth.chain_id
    except (RequestsConnectionError, OSError) as exc:
        raise Unavailable(f"no chain answers at {rpc_url}", reason=str(exc)[:200]) from exc
    load_settings().settle_latency().check_thaw_period(thaw_period_s)  # before any gas is spent
    key = signing_key(key_file, dev_account if dev_account is not None else _dev_default(chain_id), chain_id)
    me = Account.from_key(key).address
    with console.status("deploying (the first run compiles the contracts, about a minute)..."):
        dep = deploy_all(rpc_url, key, guardian=guardian or me, treasury=treasury or me, protocol_bps=protocol_bps,
                         node_bps=node_bps, thaw_period_s=thaw_period_s, challenge_period_s=challenge_period_s,
                         token=token)
    path = write_deployment(dep, out)
    console.print(f"deployed on chain {dep.chain_id}: settlement {dep.settlement}, escrow {dep.escrow}")
    console.print(f"datasets {dep.dataset_registry}, adapters {dep.adapter_registry}, token {dep.token}")
    console.print(f"wrote {path}")


def _dev_default(chain_id: int) -> int | None:
    return 0 if chain_id == load_settings().chain_id == 31337 else None
