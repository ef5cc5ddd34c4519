"""What chain-facing commands share: the RPC, the deployment, and whose key signs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import typer
from eth_account import Account

from node.chain.anvil import DEV_MNEMONIC
from node.chain.contracts import Contracts
from node.chain.deploy import Deployment, read_deployment
from node.config import DEV_CHAIN_ID, load_settings
from node.errors import ConfigError

KEY_ENV = "LORANODE_ACCOUNT_KEY"

RpcOption = typer.Option(None, "--rpc-url", help="JSON-RPC URL (default: LORANODE_RPC_URL or a local anvil).")
DeploymentOption = typer.Option(None, "--deployment", help="deployments/<chainId>.json (default from settings).")
KeyFileOption = typer.Option(None, "--key-file", help=f"File with the signing key (or set {KEY_ENV}).")
DevAccountOption = typer.Option(None, "--dev-account", help="Sign with anvil's dev account N (dev chain only).")


@dataclass(frozen=True)
class ChainContext:
    rpc_url: str
    deployment: Deployment

    def contracts(self, key: str | None = None) -> Contracts:
        return Contracts.connect(self.rpc_url, self.deployment, key)


def chain_context(rpc_url: str | None, deployment: Path | None) -> ChainContext:
    settings = load_settings()
    path = deployment or settings.resolved_deployment_file()
    if not path.exists():
        raise ConfigError(f"no deployment file at {path}: run `loranode chain deploy` or pass --deployment",
                          path=str(path))
    dep = read_deployment(path)
    return ChainContext(rpc_url or settings.rpc_url or "http://127.0.0.1:8545", dep)


def signing_key(key_file: Path | None, dev_account: int | None, chain_id: int) -> str:
    """The key a command signs with: --key-file, then LORANODE_ACCOUNT_KEY, then --dev-account."""
    if key_file is not None:
        try:
            return key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {key_file}", reason=str(exc)) from exc
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].strip()
    if dev_account is not None:
        if chain_id != DEV_CHAIN_ID:
            raise ConfigError("--dev-account only works on the dev chain", chain_id=chain_id)
        Account.enable_unaudited_hdwallet_features()
        acct = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{dev_account}")
        return str(acct.key.to_0x_hex())
    raise ConfigError(f"no signing key: pass --key-file, set {KEY_ENV}, or --dev-account N on the dev chain")
