"""`loranode dev` serves where `loranode request` looks: on the default URL when its port is free, and
in every case on the URL of the `export LORANODE_NODE_URL=...` line it prints; that line sets every
variable README's second shell uses, as `.loranode/dev.env` does. It serves x402 too: docs/x402.md's
"By hand" block (fund an agent's own key, pay with the stock SDK, read the receipt, refund) runs as written
against it, and `loranode chain fund` refuses any chain but the dev chain."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from node.chain.anvil import Anvil
from node.chain.contracts import Contracts
from node.chain.deploy import read_deployment
from node.cli import app
from node.cli.context import DEFAULT_NODE_URL

pytestmark = [pytest.mark.chain, pytest.mark.slow]
START_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[2]
BY_HAND = re.compile(r"<!-- by-hand: x402 agent[^>]*-->\s*```bash\n(.*?)```", re.S)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def shell_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `loranode dev` runs (its .loranode/dev.env) and the second shell's lines: `.venv` is pytest's."""
    folder = tmp_path_factory.mktemp("shell")
    (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder


@pytest.fixture(scope="module")
def dev_exports(tmp_path_factory: pytest.TempPathFactory, shell_folder: Path
                ) -> Iterator[tuple[dict[str, str], bool]]:
    """The variables `loranode dev`'s export line sets, and whether the default port was free."""
    default_free = _port_is_free(int(DEFAULT_NODE_URL.rsplit(":", 1)[1]))
    folder = tmp_path_factory.mktemp("dev")
    proc = subprocess.Popen([sys.executable, "-m", "node", "dev", "--data-dir", str(folder)], cwd=shell_folder,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield _read_exports(proc), default_free
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read_exports(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + START_TIMEOUT_S, []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("export "):
            return dict(pair.split("=", 1) for pair in line.split()[1:])
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError("loranode dev ended before printing its URL:\n" + "".join(seen))


def test_dev_serves_on_the_url_request_uses_by_default(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports, default_free = dev_exports
    if default_free:
        assert exports["LORANODE_NODE_URL"] == DEFAULT_NODE_URL
    assert exports["LORANODE_NODE_URL"].startswith("http://127.0.0.1:")


def test_the_export_line_sets_what_the_readme_lines_use(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports = dev_exports[0]
    assert set(exports) == {"LORANODE_RPC_URL", "LORANODE_DEPLOYMENT_FILE", "LORANODE_NODE_URL", "NODE_URL", "NODE",
                            "BASE_MODEL"}
    assert exports["NODE_URL"] == exports["LORANODE_NODE_URL"]
    assert exports["NODE"].startswith("0x") and len(exports["NODE"]) == 42
    assert (Path(exports["BASE_MODEL"]) / "config.json").is_file()
    assert Path(exports["LORANODE_DEPLOYMENT_FILE"]).is_file()


def test_request_finds_dev_through_its_export_line(dev_exports: tuple[dict[str, str], bool], tmp_path: Path) -> None:
    """An unfunded dev account, pasting dev's export line: the node is found and says why it refuses."""
    env = {**os.environ, **dev_exports[0]}
    out = subprocess.run([sys.executable, "-m", "node", "request", "the sea", "--adapter", "1", "--dev-account", "9"],
                         env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the node refused the" in out.stderr and "Traceback" not in out.stderr
    assert "no node answers" not in out.stderr


def test_an_agent_funds_its_own_key_pays_with_x402_and_is_refunded_by_hand(
        dev_exports: tuple[dict[str, str], bool], shell_folder: Path) -> None:
    """docs/x402.md's "By hand" block in one fresh bash, as written: the fee the receipt names is all
    the agent's wallet is short of afterwards (the refund gave the rest of its deposit back)."""
    (block,) = BY_HAND.findall((ROOT / "docs" / "x402.md").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORANODE_") and k != "VIRTUAL_ENV"}
    done = subprocess.run(["bash", "-e", "-c", block], cwd=shell_folder, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    fee = int(re.search(r"^receipt \S+ fee (\d+) signed by (0x[0-9a-fA-F]{40})$", out, re.M).group(1))  # type: ignore[union-attr]
    assert f"charged {fee} channel 0x" in out, out
    refund = re.search(r"^refund True tx (0x[0-9a-f]{64}) amount (\d+)$", out, re.M)
    assert refund and int(refund.group(2)) > 0, out
    agent = re.findall(r"^(0x[0-9a-fA-F]{40}): ", out, re.M)
    assert len(agent) == 2 and agent[0] == agent[1], out
    exports = dev_exports[0]
    token = Contracts.connect(exports["LORANODE_RPC_URL"], read_deployment(Path(exports["LORANODE_DEPLOYMENT_FILE"])),
                              None).token
    decimals = int(token._call("decimals"))
    assert 0 < fee < 10 * 10**decimals
    assert token.balance_of(agent[0]) == 10 * 10**decimals - fee, out


def test_dev_prints_the_x402_terms_and_a_funded_agent_key(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports = dev_exports[0]
    dep = read_deployment(Path(exports["LORANODE_DEPLOYMENT_FILE"]))
    assert dep.x402_router and dep.x402_channels
    token = Contracts.connect(exports["LORANODE_RPC_URL"], dep, None).token
    assert token.balance_of(_dev_address(8)) == 100 * 10 ** int(token._call("decimals"))


def test_fund_gives_tokens_and_gas_money_on_the_dev_chain(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports, agent = dev_exports[0], Account.create().address
    result = CliRunner().invoke(app, ["chain", "fund", agent, "--tokens", "2.5", "--eth", "0.5"], env=exports)
    assert result.exit_code == 0, result.output
    assert f"{agent}: 2.5 tokens" in result.output and "0.5 ETH on chain 31337" in result.output, result.output
    token = Contracts.connect(exports["LORANODE_RPC_URL"], read_deployment(Path(exports["LORANODE_DEPLOYMENT_FILE"])),
                              None).token
    assert token.balance_of(agent) == 25 * 10 ** (int(token._call("decimals")) - 1)


def _dev_address(index: int) -> str:
    from node.chain.anvil import DEV_MNEMONIC

    Account.enable_unaudited_hdwallet_features()
    return str(Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}").address)


def test_fund_refuses_any_chain_but_the_dev_chain_in_one_line() -> None:
    anvil = Anvil(chain_id=8453).start()  # a chain that is not the dev chain, with the dev keys funded
    try:
        target = "0x000000000000000000000000000000000000dEaD"
        before = anvil.rpc("eth_getBalance", target, "latest")
        result = CliRunner().invoke(app, ["chain", "fund", target, "--eth", "1", "--rpc-url", anvil.rpc_url])
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert "mints test tokens on the dev chain (id 31337) only, not on chain id 8453" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert anvil.rpc("eth_getBalance", target, "latest") == before
        assert int(str(anvil.rpc("eth_getTransactionCount", _dev_address(2), "latest")), 16) == 0
    finally:
        anvil.stop()
