"""Gas of the calls users pay for, from the forge gas tests (contracts/test/Gas.t.sol), each call run
as its own transaction (`--isolate`, so cold storage and the 21,000 base are counted as on chain).

    python bench/contract_gas.py

Prints the table docs/contracts.md carries and writes bench/results/contract_gas.json. The baseline
is settle with one voucher: the ratio column shows how settle grows with vouchers (and not receipts).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from node.toolchain import REPO_ROOT, forge_binary

RESULTS = Path(__file__).resolve().parent / "results" / "contract_gas.json"
LINE = re.compile(r"^\s*gas (.+?) (\d+)$")


def measure() -> dict[str, int]:
    done = subprocess.run([str(forge_binary()), "test", "--match-contract", "GasTest", "--isolate", "-vv"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=True)
    found = {}
    for line in done.stdout.splitlines():
        m = LINE.match(line)
        if m:
            found[m.group(1)] = int(m.group(2))
    return found


def main() -> None:
    gas = measure()
    base = gas["Settlement.settle (1 voucher)"]
    print(f"| {'call':<52} | {'gas':>9} | {'x settle(1)':>11} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 13}|")
    for name, used in sorted(gas.items()):
        print(f"| {name:<52} | {used:>9,} | {used / base:>11.2f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(gas, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
