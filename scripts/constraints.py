"""Write constraints.txt: the exact version of every package the image installs, as installed in the
virtualenv the tests ran in (`pip freeze`, kept to what `pip install .` needs: pyproject's dependencies and
theirs, without the dev extras). The Dockerfile installs with `-c constraints.txt`, so the image runs the
libraries the tests ran. torch is left out (TORCH_SPEC pins it; its CPU and CUDA builds bring their own
dependencies), and so is triton, which a CUDA build of torch pins to its own version. Of the dev extras,
the gates `make lint` runs (GATES) are pinned too, with what they bring: `make setup` installs with
`-c constraints.txt`, so a new mypy or ruff release cannot turn the gate red on code nobody changed.

    .venv/bin/python scripts/constraints.py            # after changing pyproject.toml or upgrading the venv
    .venv/bin/python scripts/constraints.py --check    # exit 1 if constraints.txt is not what it would write
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "constraints.txt"
LEFT_OUT = {"torch", "triton"}  # TORCH_SPEC, and the triton its CUDA build pins
GATES = ("mypy", "ruff")  # dev extras that `make lint` runs
HEADER = ("# The versions the image installs (Dockerfile: pip install -c constraints.txt), from the venv the tests\n"
          "# ran in. Written by scripts/constraints.py: run it again after changing pyproject.toml's dependencies.\n")


def _needs(requirement: Requirement, extras: frozenset[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras or {""})


def pins(project: str = "loranode", gates: tuple[str, ...] = GATES) -> dict[str, str]:
    """name -> installed version, for every package `pip install <project>` brings in (less LEFT_OUT), and
    for the gates and every package they bring in."""
    found = {canonicalize_name(gate): metadata.version(gate) for gate in gates}
    todo = [(name, frozenset[str]()) for name in (project, *gates)]
    seen = set[tuple[str, frozenset[str]]]()
    while todo:
        name, extras = todo.pop()
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            key, wanted = canonicalize_name(requirement.name), frozenset(requirement.extras)
            if key in LEFT_OUT or not _needs(requirement, extras) or (key, wanted) in seen:
                continue
            seen.add((key, wanted))
            found[key] = metadata.version(key)
            todo.append((key, wanted))
    return found


def render(found: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


def main(argv: list[str]) -> int:
    text = render(pins())
    if "--check" in argv:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.name} is not what this venv has: run .venv/bin/python scripts/constraints.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.name}: {len(text.splitlines()) - 2} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
