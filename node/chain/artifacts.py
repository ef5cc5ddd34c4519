"""Compiled contracts: ABI and bytecode of everything in contracts/src, built once per source hash.

The compiler is the project's solc (npm, wasm) behind `scripts/solc.js`, driven through py-solc-x's
standard-JSON call with the settings forge uses (cancun, optimizer 200 runs), so the bytecode the
Python side deploys is the bytecode forge tests. A cold compile takes seconds; the result is cached
under build/contracts/<sha256 of sources + settings>.json and reused until a source changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ContractBuildError
from node.toolchain import REPO_ROOT, solc_binary

log = logging.getLogger(__name__)

CONTRACT_NAMES = ("DatasetRegistry", "AdapterRegistry", "PaymentEscrow", "Settlement", "DemoToken")
SETTINGS: dict[str, Any] = {
    "evmVersion": "cancun",
    "optimizer": {"enabled": True, "runs": 200},
    "remappings": ["@openzeppelin/contracts/=node_modules/@openzeppelin/contracts/"],
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


@dataclass(frozen=True)
class Artifact:
    """One compiled contract. `bytecode` is the creation code, 0x-hex."""

    name: str
    abi: tuple[dict[str, Any], ...]
    bytecode: str
    deployed_bytecode: str


def _sources(root: Path) -> dict[str, str]:
    src = root / "contracts" / "src"
    files = sorted(src.glob("*.sol"))
    if not files:
        raise ContractBuildError("no Solidity sources found", folder=str(src))
    return {f.relative_to(root).as_posix(): f.read_text() for f in files}


def source_hash(root: Path = REPO_ROOT) -> str:
    """sha256 over the sources, the compiler settings and the OpenZeppelin version they import."""
    oz = root / "node_modules" / "@openzeppelin" / "contracts" / "package.json"
    oz_version = json.loads(oz.read_text())["version"] if oz.exists() else "missing"
    h = hashlib.sha256()
    for path, text in _sources(root).items():
        h.update(path.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    h.update(oz_version.encode())
    return h.hexdigest()


def _compile(root: Path) -> dict[str, Artifact]:
    import solcx

    sources = {path: {"content": text} for path, text in _sources(root).items()}
    request = {"language": "Solidity", "sources": sources, "settings": SETTINGS}
    log.info("compiling %d contract sources", len(sources))
    try:
        out = solcx.compile_standard(request, base_path=str(root), allow_paths=[str(root)],
                                     solc_binary=solc_binary())
    except solcx.exceptions.SolcError as exc:
        raise ContractBuildError("solc failed", stderr=str(exc)[-4000:]) from exc
    errors = [e["formattedMessage"] for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise ContractBuildError("contracts did not compile", errors=errors)
    found: dict[str, Artifact] = {}
    for path, contracts in out["contracts"].items():
        if not path.startswith("contracts/src/"):
            continue
        for name, c in contracts.items():
            found[name] = Artifact(name, tuple(c["abi"]), "0x" + c["evm"]["bytecode"]["object"],
                                   "0x" + c["evm"]["deployedBytecode"]["object"])
    missing = [n for n in CONTRACT_NAMES if n not in found]
    if missing:
        raise ContractBuildError("expected contracts missing from the build", missing=missing)
    return found


def _dump(artifacts: dict[str, Artifact]) -> str:
    return json.dumps({n: {"abi": list(a.abi), "bytecode": a.bytecode,
                           "deployedBytecode": a.deployed_bytecode} for n, a in artifacts.items()},
                      sort_keys=True)


def _parse(text: str) -> dict[str, Artifact]:
    """The cached build, less interfaces (nothing to deploy)."""
    raw = json.loads(text)
    return {n: Artifact(n, tuple(a["abi"]), a["bytecode"], a["deployedBytecode"]) for n, a in raw.items()
            if a["bytecode"] != "0x"}


_memo: dict[tuple[Path, str], dict[str, Artifact]] = {}


def load_artifacts(root: Path = REPO_ROOT, cache_dir: Path | None = None) -> dict[str, Artifact]:
    """Every contract in contracts/src by name, compiled at most once per source hash."""
    digest = source_hash(root)
    key = (root, digest)
    if key in _memo:
        return _memo[key]
    folder = cache_dir or root / "build" / "contracts"
    cached = folder / f"{digest}.json"
    if not cached.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_dump(_compile(root)))
        os.replace(tmp, cached)  # atomic: parallel test workers never read half a file
        log.info("cached contract artifacts at %s", cached)
    artifacts = _parse(cached.read_text())
    _memo[key] = artifacts
    return artifacts
