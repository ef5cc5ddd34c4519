"""What chain-facing commands share: the RPC, the deployment, and whose key signs.

Every command module imports this one, so it imports web3 and eth_account only inside the functions
that use them: `loranode --help`, and every command that never signs or reads the chain, starts
without them (they were 2.5 of its 3 seconds of imports).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from node.config import DEV_CHAIN_ID, load_settings
from node.errors import BadRequest, ConfigError

if TYPE_CHECKING:
    from node.chain.contract_client import NonceLock
    from node.chain.contracts import Contracts
    from node.chain.deploy import Deployment
    from node.chain.tx_manager import FeePolicy

KEY_ENV = "LORANODE_ACCOUNT_KEY"
NODE_URL_ENV = "LORANODE_NODE_URL"
DEFAULT_NODE_URL = "http://127.0.0.1:8000"  # `loranode dev` listens there when the port is free
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def address(param: typer.CallbackParam, value: str | None) -> str | None:
    """An address option's value, checked before the command runs: 0x and 40 hex digits (a mixed-case
    one must be a valid checksum)."""
    if value is None:
        return None
    from eth_utils import is_checksum_address, to_checksum_address

    option = param.opts[0] if param.opts else param.name
    if not ADDRESS.match(value):
        raise BadRequest(f"{option} {value!r} is not an address (0x and 40 hex digits)", param=option)
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(value):
        raise BadRequest(f"{option} {value} has a wrong checksum (a typo?): its checksummed form is "
                         f"{to_checksum_address(value)}; all lower case skips the check", param=option)
    return value

RpcOption = typer.Option(None, "--rpc-url", help="JSON-RPC URL (default: LORANODE_RPC_URL or a local anvil).")
DeploymentOption = typer.Option(None, "--deployment", help="deployments/<chainId>.json (default from settings).")
KeyFileOption = typer.Option(None, "--key-file", help=f"File with the signing key (or set {KEY_ENV}).")
DevAccountOption = typer.Option(None, "--dev-account", min=0,
                                help="Sign with anvil's dev account N (dev chain only).")
NodeUrlOption = typer.Option(DEFAULT_NODE_URL, "--node-url", envvar=NODE_URL_ENV,
                             help=f"The node's API (or set {NODE_URL_ENV}; `loranode dev` prints the line "
                                  "that exports it).")


@dataclass(frozen=True)
class ChainContext:
    rpc_url: str
    deployment: Deployment
    fees: FeePolicy | None = None  # the node's settings': a command's transaction is replaced as the node's are
    nonce_lock: NonceLock | None = None  # the node database's key lock where there is one (`cli_nonce_lock`)

    def contracts(self, key: str | None = None) -> Contracts:
        from node.chain.contract_client import local_nonce_lock
        from node.chain.contracts import Contracts

        return Contracts.connect(self.rpc_url, self.deployment, key, self.fees, self.nonce_lock or local_nonce_lock)


def cli_nonce_lock() -> NonceLock:
    """The lock a command takes to pick and broadcast a nonce: the node's database's `key_lock` when this
    machine has the node's database (database_url set, or the embedded SQLite file exists), so a command
    never signs the nonce the settlement worker, an API replica or another command is signing with the same
    key; else the lock of this process only (a payee or dApp without a node). A database that does not
    answer stops the command here (sqlalchemy's OperationalError: the console's one line), before any gas."""
    from node.chain.contract_client import local_nonce_lock

    settings = load_settings()
    url = settings.resolved_database_url()
    if settings.database_url is None and not (settings.data_dir / "loranode.db").exists():
        return local_nonce_lock
    from node.chain.tx_store import key_lock
    from node.db.session import make_engine

    engine = make_engine(url, pooled=False)
    with engine.connect():  # a command sends several transactions: it stops before the first, not halfway
        pass
    return key_lock(engine)


def chain_context(rpc_url: str | None, deployment: Path | None) -> ChainContext:
    from node.chain.deploy import read_deployment

    settings = load_settings()
    path = deployment or settings.resolved_deployment_file()
    if not path.exists():
        raise ConfigError(f"no deployment file at {path}: run `loranode chain deploy` or pass --deployment",
                          path=str(path))
    dep = read_deployment(path)
    return ChainContext(rpc_url or settings.rpc_url or "http://127.0.0.1:8545", dep, settings.fee_policy(),
                        cli_nonce_lock())


def signing_key(key_file: Path | None, dev_account: int | None, chain_id: int | Callable[[], int]) -> str:
    """The key a command signs with: --key-file, then LORANODE_ACCOUNT_KEY, then --dev-account (the
    chain id, or what reads it, is only needed then: dev accounts exist on the dev chain only)."""
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read key file {key_file}", reason=str(exc)) from exc
        return _checked_key(text, f"the key file {key_file}")
    if os.environ.get(KEY_ENV):
        return _checked_key(os.environ[KEY_ENV], KEY_ENV)
    if dev_account is not None:
        chain = chain_id() if callable(chain_id) else chain_id
        if chain != DEV_CHAIN_ID:
            raise ConfigError("--dev-account only works on the dev chain", chain_id=chain)
        from eth_account import Account

        from node.chain.anvil import DEV_MNEMONIC

        Account.enable_unaudited_hdwallet_features()
        acct = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{dev_account}")
        return str(acct.key.to_0x_hex())
    raise ConfigError(f"no signing key: pass --key-file, set {KEY_ENV}, or --dev-account N on the dev chain")


def _checked_key(text: str, source: str) -> str:
    """`text` stripped, if it is a private key (never printed: only where it came from)."""
    from eth_account import Account

    key = text.strip()
    try:
        Account.from_key(key)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source} does not hold a private key: expected 0x and 64 hex digits "
                          f"(found {len(key)} characters)") from exc
    return key
