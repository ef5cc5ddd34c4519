"""`loranode escrow deposit|thaw|withdraw|show`: a dApp funds its payments to a node."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
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
    signing_key,
)
from node.cli.node_api import utc_time
from node.errors import BadRequest

app = typer.Typer(help="Deposit to a node's escrow, thaw, withdraw, and see balances.", no_args_is_help=True)
NodeArg = typer.Option(..., "--node", callback=address, help="The node's operator address (GET /v1/node: `node`).")
AmountArg = typer.Argument(..., help="Amount in tokens (e.g. 12.5), or in base units with --base-units.")


def checked_amount(text: str) -> Decimal:
    """An amount as typed: a finite number, not negative (checked before anything is sent)."""
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise BadRequest(f"not an amount: {text!r}") from exc
    if not value.is_finite() or value < 0 or value.adjusted() > 80:  # 2**256 has 78 digits
        raise BadRequest(f"not an amount: {text!r} (a number of tokens, 0 or more, below 2**256)")
    return value


def parse_amount(text: str, decimals: int, base_units: bool) -> int:
    value = checked_amount(text)
    scaled = value if base_units else value * (Decimal(10) ** decimals)
    if scaled != scaled.to_integral_value() or scaled < 0:
        raise BadRequest(f"{text} is not a whole number of base units", decimals=decimals)
    return int(scaled)


def _setup(rpc_url: str | None, deployment: Path | None, key_file: Path | None, dev_account: int | None):  # type: ignore[no-untyped-def]
    ctx = chain_context(rpc_url, deployment)
    key = signing_key(key_file, dev_account, ctx.deployment.chain_id)
    contracts = ctx.contracts(key)
    return contracts, int(contracts.token._call("decimals"))


@app.command()
def deposit(amount: str = AmountArg, node: str = NodeArg,
            base_units: bool = typer.Option(False, "--base-units", help="The amount is in base units."),
            mint: bool = typer.Option(False, "--mint", help="Mint it first (the demo token's open faucet)."),
            rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
            dev_account: int = DevAccountOption) -> None:
    """Approve and deposit `amount` for `node` (approval is sent only when needed)."""
    checked_amount(amount)  # before anything is sent
    c, decimals = _setup(rpc_url, deployment, key_file, dev_account)
    value = parse_amount(amount, decimals, base_units)
    if mint:
        c.token.mint(c.client.address, value)
    if c.token.balance_of(c.client.address) < value:
        raise BadRequest("not enough tokens in the wallet", balance=c.token.balance_of(c.client.address),
                         amount=value)
    c.escrow.deposit(node, value, c.token)
    _print_account(c, node, decimals)


@app.command()
def thaw(amount: str = AmountArg, node: str = NodeArg,
         base_units: bool = typer.Option(False, "--base-units", help="The amount is in base units."),
         rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
         dev_account: int = DevAccountOption) -> None:
    """Start thawing `amount` (0 cancels); withdraw it after the thawing period."""
    checked_amount(amount)
    c, decimals = _setup(rpc_url, deployment, key_file, dev_account)
    c.escrow.thaw(node, parse_amount(amount, decimals, base_units))
    _print_account(c, node, decimals)


@app.command()
def withdraw(node: str = NodeArg, rpc_url: str = RpcOption, deployment: Path = DeploymentOption,
             key_file: Path = KeyFileOption, dev_account: int = DevAccountOption) -> None:
    """Withdraw the thawed amount once the thawing period is over."""
    c, decimals = _setup(rpc_url, deployment, key_file, dev_account)
    c.escrow.withdraw(node)
    _print_account(c, node, decimals)


@app.command()
def show(node: str = NodeArg,
         payer: str = typer.Option(None, callback=address, help="Payer address (default: the signer)."),
         rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
         dev_account: int = DevAccountOption) -> None:
    """Print the escrow account of (payer, node)."""
    if payer is None:
        c, decimals = _setup(rpc_url, deployment, key_file, dev_account)
    else:
        c = chain_context(rpc_url, deployment).contracts()
        decimals = int(c.token._call("decimals"))
    _print_account(c, node, decimals, payer)


def _print_account(c, node: str, decimals: int, payer: str | None = None) -> None:  # type: ignore[no-untyped-def]
    who = payer or c.client.address
    acct = c.escrow.account(who, node)
    unit = Decimal(10) ** decimals
    console.print(f"escrow of {who} for node {node}: balance {Decimal(acct.balance) / unit} "
                  f"(thawing {Decimal(acct.thawing) / unit}, thaw ends at {utc_time(acct.thaw_end_at)})")
