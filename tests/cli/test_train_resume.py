"""`loranode adapter train` as a user runs it, in its own process: Ctrl-C (SIGINT) mid-training ends
the step in progress, writes a checkpoint, says how to go on and exits 130; the same command with
`--resume` goes on from there and ends with the weights of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from node.chain.anvil import Anvil
from node.cli import app
from node.devkit.corpus import STYLES
from node.training import CHECKPOINT_DIR

pytestmark = [pytest.mark.chain, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 100  # ~50 ms each on one busy core: the run is still going when the signal lands
STEP_TIMEOUT_S = 240  # a process start and the model load, on a busy machine
TrainArgs = tuple[dict[str, str], list[str]]


@pytest.fixture(scope="module")
def train_args(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[TrainArgs]:
    """The environment and the `adapter train` arguments (less --out) for a registered dataset."""
    folder = tmp_path_factory.mktemp("train-resume")
    runner = CliRunner()
    with Anvil() as chain:
        deployed = runner.invoke(app, ["chain", "deploy", "--rpc-url", chain.rpc_url, "--out", str(folder),
                                       "--dev-account", "0", "--challenge-period-s", "0", "--thaw-period-s", "3600"])
        assert deployed.exit_code == 0, deployed.output
        env = {**os.environ, "LORANODE_RPC_URL": chain.rpc_url, "PYTHONPATH": str(ROOT),
               "OMP_NUM_THREADS": "1",  # torch's threads spin-wait on each other when the cores are taken
               "LORANODE_DEPLOYMENT_FILE": str(folder / "31337.json")}
        data = folder / "corpus.txt"
        data.write_text("\n".join(STYLES.values()) * 20)
        registered = runner.invoke(app, ["dataset", "register", str(data), "--dev-account", "3"], env=env)
        assert registered.exit_code == 0, registered.output
        dataset_id = registered.output.split("dataset ")[1].split(" ")[0]
        yield env, ["adapter", "train", "--base", str(tiny_model), "--dataset", dataset_id, "--seq-len", "32",
                    "--batch-size", "2", "--max-steps", str(STEPS), "--checkpoint-every", "0"]


def _loranode(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "node", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=STEP_TIMEOUT_S)
    return proc.returncode, out


def _ctrl_c_after_the_first_step(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Read until the first step's progress line, then send SIGINT as a terminal's Ctrl-C does."""
    assert proc.stdout is not None
    seen, deadline = [], time.monotonic() + STEP_TIMEOUT_S
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(seen)
    code, rest = _finish(proc)
    return code, "".join(seen) + rest


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_ctrl_c_leaves_a_checkpoint_and_resume_ends_as_an_uninterrupted_run(
        train_args: TrainArgs, tmp_path: Path) -> None:
    env, args = train_args
    cut = tmp_path / "cut"
    whole = _loranode(env, *args, "--out", str(tmp_path / "whole"))  # alongside: the box has two cores
    code, out = _ctrl_c_after_the_first_step(_loranode(env, *args, "--out", str(cut)))
    assert code == 130, out
    assert "stopping after this step to write a checkpoint" in out, out
    assert f"checkpoint written to {cut / CHECKPOINT_DIR}; run the same command with --resume" in out, out
    assert "Traceback" not in out and not (cut / "adapter_model.safetensors").exists()
    stopped_at = int(out.split("interrupted after step ")[1].split(":")[0])
    assert 1 <= stopped_at < STEPS and (cut / CHECKPOINT_DIR / "trainer_state.pt").is_file()

    code, out = _finish(_loranode(env, *args, "--out", str(cut), "--resume"))
    assert code == 0, out
    assert f"resumed at step {stopped_at}" in out and f"step {STEPS}/{STEPS}" in out, out
    assert f"{STEPS - stopped_at} steps" in out and not (cut / CHECKPOINT_DIR).exists()
    code, out = _finish(whole)
    assert code == 0, out
    expected, got = _weights(tmp_path / "whole"), _weights(cut)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_with_other_options_is_refused_and_without_a_checkpoint_starts_over(
        train_args: TrainArgs, tmp_path: Path) -> None:
    env, args = train_args
    out_dir = tmp_path / "adapter"
    code, out = _ctrl_c_after_the_first_step(_loranode(env, *args, "--out", str(out_dir)))
    assert code == 130, out
    other = [a if a != "32" else "16" for a in args]  # another --seq-len: not the interrupted run
    code, out = _finish(_loranode(env, *other, "--out", str(out_dir), "--resume"))
    assert code == 2 and "is of another run (it differs in seq_len)" in out and "Traceback" not in out, out
    code, out = _finish(_loranode(env, *args[:-4], "--max-steps", "2", "--out", str(tmp_path / "new"), "--resume"))
    assert code == 0 and f"no checkpoint in {tmp_path / 'new' / CHECKPOINT_DIR}: training from the start" in out, out
