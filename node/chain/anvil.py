"""A local anvil chain on a free loopback port, for `loranode dev`, the demo and the tests."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from node.errors import ChainError
from node.toolchain import anvil_binary

log = logging.getLogger(__name__)

# anvil's well-known development mnemonic; refused on any chain id but the dev one (see config).
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_CHAIN_ID = 31337


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Anvil:
    """An anvil process. `keys` are the funded development accounts' private keys (0x-hex)."""

    port: int = 0
    chain_id: int = DEV_CHAIN_ID
    block_time: float | None = None
    num_accounts: int = 20
    state_path: Path | None = None
    keys: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Anvil:
        self.port = self.port or free_port()
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(self.port),
               "--chain-id", str(self.chain_id), "--accounts", str(self.num_accounts),
               "--mnemonic", DEV_MNEMONIC, "--hardfork", "cancun", "--silent"]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        if self.state_path:
            cmd += ["--state", str(self.state_path)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise ChainError("anvil exited at start", stderr=err[-2000:], port=self.port)
            if self._rpc("eth_chainId") is not None:
                self.keys = self._dev_keys()
                log.info("anvil up on port %d", self.port)
                return self
            time.sleep(0.05)
        self.stop()
        raise ChainError("anvil did not answer in time", port=self.port, timeout_s=timeout_s)

    def _dev_keys(self) -> list[str]:
        from eth_account import Account

        Account.enable_unaudited_hdwallet_features()
        return [Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key.to_0x_hex()
                for i in range(self.num_accounts)]

    def _rpc(self, method: str, params: list[object] | None = None) -> object | None:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        req = urllib.request.Request(self.rpc_url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                answer: dict[str, object] = json.loads(resp.read())
                return answer.get("result")
        except OSError:
            return None

    def rpc(self, method: str, *params: object) -> object:
        """Call a JSON-RPC method (anvil_* and evm_* cheat methods included)."""
        result = self._rpc(method, list(params))
        return result

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
