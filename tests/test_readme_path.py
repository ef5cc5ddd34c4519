"""README.md's "Try it by hand" path, run as written: shell 1's lines start `loranode dev`, shell 2's
lines run one by one in one fresh bash (its variables carry from line to line, as in a terminal).
Every line must succeed, the epoch must settle, and the contributor's earnings must show, then show
claimed. With LORANODE_TRANSCRIPT=docs/by-hand.md the run's transcript is written there.

The only change to the README's lines: shell 1's `--port 8000` becomes a free port (tests run in
parallel). They run in an empty folder whose `.venv` is the virtualenv running pytest."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.chain.anvil import free_port

pytestmark = [pytest.mark.chain, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- by-hand: (shell \d)[^>]*-->\s*```bash\n(.*?)```", re.S)
CONTRIBUTOR = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"  # anvil dev account 3
END = "__by_hand_rc="
STEP = "__by_hand_step__"
Step = tuple[str, str, int, float]  # the line, what it printed, its exit code, its seconds


def readme_blocks() -> dict[str, list[str]]:
    """The README's marked blocks: name -> their lines."""
    blocks = {name: [ln for ln in body.splitlines() if ln.strip()]
              for name, body in MARKER.findall((ROOT / "README.md").read_text())}
    assert set(blocks) == {"shell 1", "shell 2"}, blocks.keys()
    return blocks


def fresh_env() -> dict[str, str]:
    """A new terminal's environment: no LORANODE_* settings; this checkout's code first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORANODE_") and k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").is_file() and (venv / "bin" / "loranode").is_file(), \
        f"pytest must run from the project's virtualenv (with `loranode` installed), not {venv}"
    (tmp_path / ".venv").symlink_to(venv)
    return tmp_path


@pytest.fixture
def dev_node(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Shell 1's lines, running; yields the command run and what it printed once it is up."""
    lines = readme_blocks()["shell 1"]
    assert any("--port 8000" in ln for ln in lines)
    lines = [ln.replace("--port 8000", f"--port {free_port()}") for ln in lines]
    log = folder / "shell1.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", "\n".join(lines)], cwd=folder, env=fresh_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / ".loranode" / "dev.env").is_file():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "loranode dev did not start in time:\n" + log.read_text()
            time.sleep(0.5)
        while "Ctrl-C stops." not in log.read_text():  # the rest of its banner: its last line
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "loranode dev printed no banner in time:\n" + log.read_text()
            time.sleep(0.2)
        yield "\n".join(lines), log.read_text().splitlines()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C: dev stops anvil, the worker and the beat
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_lines(lines: list[str], cwd: Path) -> list[Step]:
    """Each line in one bash, in order, stopping at the first that fails."""
    script = "".join(f"echo {STEP}; printf '%s\\n' {shlex.quote(ln)}; t0=$(date +%s%N)\n{ln}\n"
                     f"rc=$?; echo {END}$rc $(( ($(date +%s%N) - t0) / 1000000 )); [ $rc -eq 0 ] || exit $rc\n"
                     for ln in lines)
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=fresh_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    text = done.stdout.decode(errors="replace")
    steps = []
    for chunk in text.split(STEP + "\n")[1:]:
        command, _, rest = chunk.partition("\n")
        output, _, rc = rest.rpartition(END)
        code, _, millis = rc.strip().partition(" ")
        steps.append((command, _as_shown(output), int(code) if code else -1, int(millis or 0) / 1000))
    assert steps, text
    return steps


def _as_shown(output: str) -> str:
    """What a terminal shows: each line's last carriage-return rewrite (progress bars)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in output.rstrip("\n").splitlines())


def test_the_readme_by_hand_path_works_pasted_line_by_line(folder: Path, dev_node: tuple[str, list[str]]) -> None:
    lines = readme_blocks()["shell 2"]
    started = time.monotonic()
    steps = run_lines(lines, folder)
    seconds = time.monotonic() - started
    failed = [step for step in steps if step[2] != 0]
    assert not failed and len(steps) == len(lines), failed or steps[-1]
    earnings = [out for cmd, out, _, _ in steps if cmd.startswith(f"loranode earnings {CONTRIBUTOR}")]
    shown = "\n".join(out for cmd, out, _, _ in steps if cmd.startswith("loranode epoch show"))
    assert "state:         final" in shown and "receipts:      1" in shown
    assert re.search(r"^\s+1\s+final\s+\d+\s+0\s+claimable\s+dataset 1 \d+$", earnings[0], re.M), earnings[0]
    assert re.search(r"^\s+1\s+final\s+(\d+)\s+\1\s+claimed\s+dataset 1 \d+$", earnings[-1], re.M), earnings[-1]
    claimed = re.search(r"^\s+1\s+final\s+(\d+)\s+\1\s+claimed", earnings[-1], re.M)
    claim = next(out for cmd, out, _, _ in steps if cmd.startswith("loranode claim"))
    assert claimed and f"{CONTRIBUTOR} received {claimed.group(1)} (" in claim, claim  # the units earnings shows
    owner = steps[-1][1]
    assert "adapter 1 owner" in owner, owner
    banner = dev_node[1]  # what README says shell 1 prints: the x402 terms next to the node's address
    assert any(ln.startswith("x402: batch-settlement on eip155:31337") for ln in banner), banner
    if os.environ.get("LORANODE_TRANSCRIPT"):
        write_transcript(Path(os.environ["LORANODE_TRANSCRIPT"]), dev_node, steps, seconds)


def write_transcript(path: Path, dev_node: tuple[str, list[str]], steps: list[Step],
                     seconds: float) -> None:
    command, banner = dev_node
    parts = ["# The README's by-hand path: a transcript\n",
             "Generated by `LORANODE_TRANSCRIPT=docs/by-hand.md pytest tests/test_readme_path.py`, which runs\n"
             "README.md's \"Try it by hand\" lines as written (shell 1's port is a free one) and checks each.\n"
             f"Shell 2 took {seconds:.0f} s on the machine that wrote this (each command's time after it; most\n"
             "of it is Python starting `loranode` on a busy 2-core box).\n",
             "## Shell 1\n", "```console", *(f"$ {ln}" for ln in command.splitlines()), *banner, "```\n",
             "## Shell 2\n", "```console"]
    for cmd, out, _, took in steps:
        parts += [f"$ {cmd}", *([out] if out else []), f"# ({took:.1f} s)"]
    parts.append("```\n")
    path.write_text("\n".join(parts))
