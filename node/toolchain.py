"""Where the project-local tools live: anvil, forge and the solc front installed by `make setup`.

Looked up in this order: an explicit environment variable, the repository's `node_modules`, `PATH`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from node.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
_FOUNDRY = REPO_ROOT / "node_modules" / "@foundry-rs"


def _find(env: str, local: Path, name: str) -> Path:
    explicit = os.environ.get(env)
    if explicit:
        return Path(explicit)
    if local.exists():
        return local
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ConfigError(f"{name} not found: run `make setup`, or set {env}", tool=name, looked_in=str(local))


def anvil_binary() -> Path:
    return _find("LORANODE_ANVIL", _FOUNDRY / "anvil-linux-amd64" / "bin" / "anvil", "anvil")


def forge_binary() -> Path:
    return _find("LORANODE_FORGE", _FOUNDRY / "forge-linux-amd64" / "bin" / "forge", "forge")


def solc_binary() -> Path:
    return _find("LORANODE_SOLC", REPO_ROOT / "scripts" / "solc.js", "solc")


def node_script_env() -> dict[str, str]:
    """Environment for `node` scripts that require the project's npm packages."""
    env = dict(os.environ)
    env["NODE_PATH"] = str(REPO_ROOT / "node_modules")
    return env
