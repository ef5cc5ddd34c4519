"""A chain command signs with the node database's key lock, so it never takes the nonce that the
settlement worker (or an API replica's x402 gas key, or another command) is signing with the same key.
Real anvil, real contracts, SQLite and PostgreSQL.

The attack without this: the command locked nonces in its own process only. While the worker held the
key's lock (nonce picked, not yet broadcast), the command read the same pending count and sent first: the
worker's transaction then found its nonce used ("nonce too low") and never landed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import Result
from eth_account import Account
from typer.testing import CliRunner
from web3 import Web3

from node.chain.anvil import Anvil, free_port
from node.chain.deploy import deploy_all, write_deployment
from node.chain.tx_store import key_lock
from node.db.session import make_engine

pytestmark = pytest.mark.chain
SENDER = 3  # anvil's dev account: the key the command and the "worker" share
HELD_S = 2.0  # how long the worker holds the lock: time enough for a command that ignores it to send


def _deposit_by_cli(anvil: Anvil, db_url: str, deployment_file: Path, node: str, out: list[Result]) -> None:
    from node.cli import app

    env = {"LORANODE_DATABASE_URL": db_url, "LORANODE_RPC_URL": anvil.rpc_url,
           "LORANODE_DEPLOYMENT_FILE": str(deployment_file)}
    out.append(CliRunner().invoke(app, ["escrow", "deposit", "5", "--node", node, "--mint",
                                        "--dev-account", str(SENDER)], env=env))


def test_a_command_waits_for_the_worker_holding_the_key_and_takes_the_next_nonce(
        fresh_anvil: Anvil, db_url: str, tmp_path: Path) -> None:
    keys = fresh_anvil.keys
    me = Account.from_key(keys[0]).address
    dep = deploy_all(fresh_anvil.rpc_url, keys[0], guardian=me, treasury=me, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    deployment_file = write_deployment(dep, tmp_path / "deployments")
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    worker = Account.from_key(keys[SENDER])
    results: list[Result] = []
    with key_lock(make_engine(db_url))(worker.address):  # the worker picks its nonce...
        nonce = w3.eth.get_transaction_count(worker.address, "pending")
        command = threading.Thread(target=_deposit_by_cli, args=(fresh_anvil, db_url, deployment_file, me, results))
        command.start()
        time.sleep(HELD_S)
        assert w3.eth.get_transaction_count(worker.address, "pending") == nonce, "the command sent under the lock"
        tx = {"type": 2, "chainId": dep.chain_id, "nonce": nonce, "to": me, "value": 1, "gas": 21_000,
              "maxFeePerGas": 10 * 10**9, "maxPriorityFeePerGas": 10**9}
        sent = w3.eth.send_raw_transaction(worker.sign_transaction(tx).raw_transaction)  # ...and broadcasts it
    command.join(60)
    assert results and results[0].exit_code == 0, results[0].output if results else "the command hung"
    assert w3.eth.wait_for_transaction_receipt(sent, 10)["status"] == 1, "the worker's transaction landed"
    assert w3.eth.get_transaction_count(worker.address, "latest") == nonce + 4  # its, then mint, approve, deposit



def _loranode(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`loranode ARGS` as a user runs it, in a process of its own, with the node's database at `database_url`."""
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LORANODE_DATABASE_URL": database_url, **env})


def _says_the_database_is_down(done: subprocess.CompletedProcess[str]) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 2 and lines[0].startswith("error (database_unavailable): cannot use the database"), \
        done.stderr
    assert lines[1].startswith("hint: check LORANODE_DATABASE_URL"), done.stderr


def test_a_command_whose_database_is_down_says_so_in_one_line_and_sends_nothing(
        fresh_anvil: Anvil, tmp_path: Path) -> None:
    keys = fresh_anvil.keys
    me = Account.from_key(keys[0]).address
    dep = deploy_all(fresh_anvil.rpc_url, keys[0], guardian=me, treasury=me, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/loranode"  # nothing listens there
    done = _loranode("escrow", "deposit", "5", "--node", me, "--mint", "--dev-account", str(SENDER),
                     database_url=closed, LORANODE_RPC_URL=fresh_anvil.rpc_url,
                     LORANODE_DEPLOYMENT_FILE=str(write_deployment(dep, tmp_path / "deployments")))
    _says_the_database_is_down(done)
    assert closed not in done.stderr  # a database URL may hold a password: never printed
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    assert w3.eth.get_transaction_count(Account.from_key(keys[SENDER]).address) == 0


def test_a_deploy_whose_database_is_down_spends_no_gas(fresh_anvil: Anvil, tmp_path: Path) -> None:
    """Before: the core contracts were deployed (5 transactions paid), then the x402 ones stopped at the
    database's key lock, and no deployment file named what was deployed."""
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/loranode"
    done = _loranode("chain", "deploy", "--rpc-url", fresh_anvil.rpc_url, "--out", str(tmp_path / "deployments"),
                     "--dev-account", str(SENDER), database_url=closed)
    _says_the_database_is_down(done)
    deployer = Account.from_key(fresh_anvil.keys[SENDER]).address
    assert Web3(Web3.HTTPProvider(fresh_anvil.rpc_url)).eth.get_transaction_count(deployer) == 0
