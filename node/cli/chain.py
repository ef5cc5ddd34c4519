"""`loranode chain deploy`: the contracts, once per chain; `loranode chain fund`: test tokens on the dev chain."""

from __future__ import annotations

from pathlib import Path

import typer

from node.cli.console import console
from node.cli.context import (
    DeploymentOption,
    DevAccountOption,
    KeyFileOption,
    RpcOption,
    address,
    chain_context,
    cli_nonce_lock,
    signing_key,
)
from node.config import DEV_CHAIN_ID, load_settings
from node.errors import ConfigError, Unavailable

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
                                      "node's mirror lag, a hold's life, its epoch max age and its worst-case "
                                      "settle latency together)."),
    challenge_period_s: int = typer.Option(3_600, min=0, help="Seconds an epoch stays locked (vetoable)."),
    token: str = typer.Option(None, callback=address, help="ERC-20 to pay in (default: deploy the demo token)."),
    x402: bool = typer.Option(True, "--x402/--no-x402", help="Also the x402 batch-settlement contracts (the "
                              "channel contract and its collector where absent, the node's router); the token "
                              "needs ERC-3009."),
    node: str = typer.Option(None, "--node", callback=address,
                             help="The node operator's address, whose router it is (default: the deployer)."),
    key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Deploy the loranode contracts and write their addresses to a deployment file.

    DatasetRegistry, AdapterRegistry, PaymentEscrow and Settlement, and the x402 contracts unless
    --no-x402."""
    from eth_account import Account  # the chain libraries only for the commands that use them (start-up time)

    from node.chain.contract_client import ContractClient
    from node.chain.deploy import deploy_all, write_deployment
    from node.chain.x402_channels import deploy_x402

    chain_id = _chain_id(rpc_url)
    load_settings().settle_latency().check_thaw_period(thaw_period_s)  # before any gas is spent
    key = signing_key(key_file, dev_account if dev_account is not None else _dev_default(chain_id), chain_id)
    me = Account.from_key(key).address
    nonce_lock = cli_nonce_lock() if x402 else None  # the node's database answers before any gas is spent
    with console.status("deploying (the first run compiles the contracts, about a minute)..."):
        dep = deploy_all(rpc_url, key, guardian=guardian or me, treasury=treasury or me, protocol_bps=protocol_bps,
                         node_bps=node_bps, thaw_period_s=thaw_period_s, challenge_period_s=challenge_period_s,
                         token=token)
        if nonce_lock is not None:
            dep = deploy_x402(ContractClient(rpc_url, key, nonce_lock=nonce_lock), dep, node or me)
    path = write_deployment(dep, out)
    console.print(f"deployed on chain {dep.chain_id}: settlement {dep.settlement}, escrow {dep.escrow}")
    console.print(f"datasets {dep.dataset_registry}, adapters {dep.adapter_registry}, token {dep.token}")
    if dep.x402_router:
        console.print(f"x402: channels {dep.x402_channels}, collector {dep.x402_collector}, router {dep.x402_router}")
    console.print(f"wrote {path}")


@app.command("x402")
def add_x402(
    rpc_url: str = typer.Option(..., "--rpc-url", help="JSON-RPC URL of the deployment's chain."),
    deployment: Path = typer.Option(..., "--deployment", help="The deployments/<chainId>.json to complete."),
    node: str = typer.Option(None, "--node", callback=address,
                             help="The node operator's address, whose router it is (default: the signer)."),
    key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Add the x402 contracts to a deployment file that lacks them.

    The channel contract and its collector where absent, the node's router unless the file names one;
    rewrites the file. A mirror written before must start again (its indexer then reads the channel
    contract too)."""
    from node.chain.contract_client import ContractClient
    from node.chain.deploy import read_deployment, write_deployment
    from node.chain.x402_channels import deploy_x402

    dep = read_deployment(deployment)
    if _chain_id(rpc_url) != dep.chain_id:
        raise ConfigError("the RPC's chain is not the deployment's", deployment_chain_id=dep.chain_id)
    key = signing_key(key_file, dev_account if dev_account is not None else _dev_default(dep.chain_id), dep.chain_id)
    client = ContractClient(rpc_url, key, nonce_lock=cli_nonce_lock())
    dep = deploy_x402(client, dep, node or client.address)
    write_deployment(dep, deployment.parent)
    console.print(f"x402: channels {dep.x402_channels}, collector {dep.x402_collector}, router {dep.x402_router}")


FAUCET_ACCOUNT = 2  # the dev treasury signs the demo token's mints: never the operator's (the worker's) nonces


@app.command()
def fund(
    to: str = typer.Argument(..., callback=address, help="The address to fund (an agent's own)."),
    tokens: str = typer.Option("10", "--tokens", help="Demo tokens to mint to it (whole tokens, decimals allowed)."),
    eth: str = typer.Option("0", "--eth", help="Gas money to give it, in ETH (an x402 agent needs none: the node "
                            "sends its deposit)."),
    rpc_url: str = RpcOption,
    deployment: Path = DeploymentOption,
) -> None:
    """Mint demo tokens (and give ETH) to an address, on the dev chain only.

    For an agent's own key against `loranode dev` (docs/x402.md, "By hand"); any other chain is refused
    before anything is sent."""
    from decimal import Decimal, InvalidOperation

    from eth_utils import to_checksum_address
    from web3.types import RPCEndpoint

    to = to_checksum_address(to)
    chain_id = _chain_id(rpc_url or load_settings().rpc_url or "http://127.0.0.1:8545")  # before any file is read
    if chain_id != DEV_CHAIN_ID:
        raise ConfigError(f"`loranode chain fund` mints test tokens on the dev chain (id {DEV_CHAIN_ID}) only, "
                          f"not on chain id {chain_id}", chain_id=chain_id)
    ctx = chain_context(rpc_url, deployment)
    try:
        amounts = Decimal(tokens), Decimal(eth)
    except InvalidOperation as exc:
        raise ConfigError("--tokens and --eth take numbers", tokens=tokens, eth=eth) from exc
    c = ctx.contracts(signing_key(None, FAUCET_ACCOUNT, chain_id))
    decimals = int(c.token._call("decimals"))
    value, wei = int(amounts[0] * 10**decimals), int(amounts[1] * 10**18)
    if value < 0 or wei < 0:
        raise ConfigError("--tokens and --eth must not be negative", tokens=tokens, eth=eth)
    if value:
        c.token.mint(to, value)
    if wei:
        c.client.w3.provider.make_request(RPCEndpoint("anvil_setBalance"),
                                          [to, hex(c.client.w3.eth.get_balance(to) + wei)])
    console.print(f"{to}: {Decimal(c.token.balance_of(to)) / 10**decimals:f} tokens ({c.token.address}), "
                  f"{Decimal(c.client.w3.eth.get_balance(to)) / 10**18:f} ETH on chain {chain_id}")


def _chain_id(rpc_url: str) -> int:
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from web3 import Web3

    try:
        return int(Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10})).eth.chain_id)
    except (RequestsConnectionError, OSError) as exc:
        raise Unavailable(f"no chain answers at {rpc_url}", reason=str(exc)[:200]) from exc


def _dev_default(chain_id: int) -> int | None:
    return 0 if chain_id == load_settings().chain_id == 31337 else None
