"""A user's ordinary mistakes, with every command that can make them: each ends in one line that says
what is wrong (and a hint where the next step is obvious), exit code 2, and no traceback. No chain
or node is needed to make these mistakes; the refusals of a live node are in test_refusals.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from node.chain.deploy import Deployment, write_deployment
from node.cli import app
from node.cli.console import describe
from node.client.refusal import refusal

runner = CliRunner()
NOWHERE = "http://127.0.0.1:1"  # nothing listens on port 1
ADDRESS = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
RECEIPT_ID = "0x" + "ab" * 32
NOT_A_KEY = "this is not a key\n"


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    result = runner.invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__} escaped: {result.exception}"  # i.e. a traceback
    assert "Traceback" not in result.output
    return result


def _mistake(*args: str, env: dict[str, str] | None = None) -> str:
    result = _run(*args, env=env)
    assert result.exit_code == 2, result.output
    return result.output


@pytest.fixture
def deployment(tmp_path: Path) -> dict[str, str]:
    """A deployment file for a dev chain (nothing is deployed: these mistakes stop before the RPC)."""
    dep = Deployment(chain_id=31337, token=ADDRESS, dataset_registry=ADDRESS, adapter_registry=ADDRESS,
                     escrow=ADDRESS, settlement=ADDRESS, deployer=ADDRESS, guardian=ADDRESS, treasury=ADDRESS,
                     protocol_bps=500, node_bps=1_500, thaw_period_s=3_600, challenge_period_s=0, from_block=0)
    return {"LORANODE_DEPLOYMENT_FILE": str(write_deployment(dep, tmp_path / "deployments")),
            "LORANODE_RPC_URL": NOWHERE}


def test_an_unreachable_node_url_is_named_with_where_to_find_the_right_one() -> None:
    out = _mistake("request", "the sea", "--adapter", "1", "--node-url", NOWHERE, "--dev-account", "3")
    assert f"no node answers at {NOWHERE}" in out
    assert "loranode dev" in out and "--node-url" in out and "LORANODE_NODE_URL" in out


def test_the_node_url_can_come_from_the_environment_dev_prints() -> None:
    out = _mistake("request", "the sea", "--adapter", "1", "--dev-account", "3",
                   env={"LORANODE_NODE_URL": "http://127.0.0.1:2"})
    assert "no node answers at http://127.0.0.1:2" in out


def test_a_key_file_that_is_not_hex_is_named_and_never_printed(tmp_path: Path) -> None:
    key_file = tmp_path / "dapp.key"
    key_file.write_text(NOT_A_KEY)
    out = _mistake("request", "the sea", "--adapter", "1", "--node-url", NOWHERE, "--key-file", str(key_file))
    assert f"the key file {key_file} does not hold a private key: expected 0x and 64 hex digits" in out
    assert "not a key" not in out


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    out = _mistake("request", "the sea", "--adapter", "1", "--node-url", NOWHERE,
                   "--key-file", str(tmp_path / "missing.key"))
    assert f"cannot read key file {tmp_path / 'missing.key'}" in out


def test_a_key_in_the_environment_that_is_not_hex_is_named(deployment: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "sea.txt"
    data.write_text("the sea")
    out = _mistake("dataset", "register", str(data), env={**deployment, "LORANODE_ACCOUNT_KEY": NOT_A_KEY})
    assert "LORANODE_ACCOUNT_KEY does not hold a private key" in out and "not a key" not in out


@pytest.mark.parametrize("args", [
    ("escrow", "deposit", "1", "--node", "0xabc", "--dev-account", "3"),
    ("escrow", "thaw", "1", "--node", "node", "--dev-account", "3"),
    ("escrow", "withdraw", "--node", "0x" + "g" * 40, "--dev-account", "3"),
    ("escrow", "show", "--node", ADDRESS, "--payer", "0x123"),
    ("claim", "--node", "0xabc", "--proofs", NOWHERE),
    ("claim", "--node", ADDRESS, "--account", "me", "--proofs", NOWHERE),
    ("dataset", "register", ".", "--payout", "0x12", "--dev-account", "3"),
    ("chain", "deploy", "--rpc-url", NOWHERE, "--guardian", "0xabc"),
    ("settle", "losses", "--payer", "0xabc"),
    ("epoch", "export", "--node", "0xabc", "--out", "epoch.json"),
], ids=lambda a: " ".join(a[:2]))
def test_an_invalid_address_is_refused_before_anything_runs(args: tuple[str, ...], deployment: dict[str, str]) -> None:
    out = _mistake(*args, env=deployment)
    assert "is not an address (0x and 40 hex digits)" in out


def test_an_address_with_a_wrong_checksum_is_refused_with_its_right_form(deployment: dict[str, str]) -> None:
    typo = ADDRESS[:-1] + "9"
    out = _mistake("escrow", "show", "--node", typo, "--payer", ADDRESS, env=deployment)
    assert "wrong checksum" in out


def test_an_error_shows_its_facts_in_brackets_as_they_are(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    out = _mistake("dataset", "show", "1", "--deployment", str(missing))
    assert f"error (config_error): no deployment file at {missing}" in out
    assert f"[path={missing}]" in out  # Rich would read it as a style tag and drop it


def test_an_adapter_folder_with_a_broken_lineage_file(tmp_path: Path) -> None:
    (tmp_path / "lineage.json").write_text("{not json")
    out = _mistake("adapter", "register", str(tmp_path), "--dev-account", "5")
    assert f"{tmp_path / 'lineage.json'} is not valid JSON" in out
    (tmp_path / "lineage.json").write_text('{"datasets": [1]}')
    out = _mistake("adapter", "register", str(tmp_path), "--dev-account", "5")
    assert "lacks baseModel, weightsBps" in out


@pytest.mark.parametrize("args", [("dataset", "show", "1"), ("adapter", "show", "1"),
                                  ("escrow", "show", "--node", ADDRESS, "--payer", ADDRESS)],
                         ids=lambda a: " ".join(a[:2]))
def test_an_unreachable_chain_rpc_is_named_with_where_to_find_the_right_one(args: tuple[str, ...],
                                                                            deployment: dict[str, str]) -> None:
    out = _mistake(*args, env=deployment)
    assert "error (rpc_unreachable): the chain's JSON-RPC does not answer" in out and "127.0.0.1" in out
    assert "--rpc-url" in out and "loranode dev" in out


def test_verify_names_a_base_model_folder_that_is_not_one(deployment: dict[str, str], tmp_path: Path) -> None:
    out = _mistake("attribution", "verify", RECEIPT_ID, "--base-model", str(tmp_path), env=deployment)
    assert f"{tmp_path} is not a model folder (no config.json)" in out


def test_verify_names_an_unreachable_node(deployment: dict[str, str], tiny_model: Path) -> None:
    out = _mistake("attribution", "verify", RECEIPT_ID, "--node-url", NOWHERE, "--base-model", str(tiny_model),
                   env=deployment)
    assert f"no node answers at {NOWHERE}" in out and "loranode dev" in out


def test_a_missing_output_file_is_named(deployment: dict[str, str], tmp_path: Path, tiny_model: Path) -> None:
    receipt = tmp_path / "receipt.json"
    receipt.write_text('{"receiptId": "0x00"}')
    out = _mistake("attribution", "verify", str(receipt), "--output-file", str(tmp_path / "answer.txt"),
                   "--base-model", str(tiny_model), env=deployment)
    assert f"no such file or folder: {tmp_path / 'answer.txt'}" in out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_mistake_has_no_traceback_unless_asked_with_debug() -> None:
    plain = _cli("request", "the sea", "--adapter", "1", "--node-url", NOWHERE, "--dev-account", "3")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert f"no node answers at {NOWHERE}" in plain.stderr
    debug = _cli("--debug", "request", "the sea", "--adapter", "1", "--node-url", NOWHERE, "--dev-account", "3")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert f"no node answers at {NOWHERE}" in debug.stderr


@pytest.mark.parametrize(("status", "code"),
                         [(429, "overloaded"), (503, "database_unavailable"), (500, "internal_error")])
def test_a_busy_or_broken_node_is_a_failure_with_its_own_code(status: int, code: str) -> None:
    body = json.dumps({"error": {"message": f"[{code}] as the node said", "type": "x", "code": code, "param": None,
                                 "details": {"code": code, "message": "m", "retry_after_s": 1}}})
    failure = describe(refusal(status, body, NOWHERE))
    assert (failure.code, failure.message, failure.exit_code) == (code, f"[{code}] as the node said", 1)
    assert failure.facts == {"retry_after_s": 1} and "payment" not in failure.source
    assert ("retry" in (failure.hint or "")) == (status != 500)


def test_a_bug_is_a_failure_that_points_at_debug() -> None:
    failure = describe(KeyError("lineage"))
    assert failure.exit_code == 1 and failure.code == "internal_error" and "--debug" in (failure.hint or "")


@pytest.mark.parametrize("text", ["abc", "inf", "NaN", "1e999999999999999999"])
def test_an_amount_that_is_not_one_is_refused_before_anything_is_sent(text: str, deployment: dict[str, str]) -> None:
    for command in ("deposit", "thaw"):
        out = _mistake("escrow", command, text, "--node", ADDRESS, "--dev-account", "3", env=deployment)
        assert f"not an amount: {text!r}" in out


@pytest.mark.parametrize("command", ["api"])
def test_a_process_without_its_database_says_to_create_it(command: str, deployment: dict[str, str],
                                                          tmp_path: Path) -> None:
    out = _mistake(command, env={**deployment, "LORANODE_DATA_DIR": str(tmp_path / "data")})
    assert f"no database in {tmp_path / 'data'}: run `loranode db upgrade` first" in out


def test_api_with_a_tensor_parallel_size_the_model_does_not_split_into_says_why(
        deployment: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """`--tensor-parallel-size` reaches the engine, which refuses the split before any rank starts."""
    env = {**deployment, "LORANODE_DATA_DIR": str(tmp_path / "data"), "LORANODE_MODEL_PATH": str(tiny_model),
           "LORANODE_OPERATOR_KEY": "0x" + "22" * 32}
    assert _run("db", "upgrade", env=env).exit_code == 0
    for where in ("--in-process", "--engine-process"):
        out = _mistake("api", where, "--tensor-parallel-size", "3", env=env)
        assert "4 attention heads do not split 3 ways" in out, where


@pytest.mark.parametrize(("args", "message", "where"), [
    (("dataset", "register"), "Missing argument 'path'.", "node dataset register"),
    (("no-such-command",), "No such command 'no-such-command'.", "node"),
    (("adapter", "show", "one"), "Invalid value for 'adapter_id'", "node adapter show"),
    (("--no-such-option",), "No such option: --no-such-option", "node"),
    (("escrow", "show", "--no-such-option"), "No such option: --no-such-option", "node escrow show"),
], ids=lambda a: " ".join(a) if isinstance(a, tuple) else "")
def test_a_usage_mistake_is_one_line_with_the_help_to_read(args: tuple[str, ...], message: str, where: str) -> None:
    # Click's own usage errors used to print a usage line, a "Try ..." line and a boxed message
    done = _cli(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0].startswith(f"error (usage): {message}")
    assert lines[1].startswith("hint: `") and lines[1].endswith(f"{where} --help` shows its usage")  # `loranode ...`


def test_a_group_run_bare_still_shows_its_help() -> None:
    done = _cli("adapter")
    assert "adapter [OPTIONS] COMMAND [ARGS]" in done.stdout and "train" in done.stdout and not done.stderr
