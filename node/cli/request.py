"""`loranode request`: one paid request, as a dApp would send it, with its receipt checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from node.cli.console import console
from node.cli.context import DevAccountOption, KeyFileOption, NodeUrlOption, signing_key
from node.client.refusal import refusal
from node.errors import ConfigError, NodeError, NodeUnreachable


def request(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
    adapter: str = typer.Option(None, "--adapter", help="The adapter id to answer with (GET /v1/models lists them)."),
    model: str = typer.Option(None, "--model", hidden=True, help="The old spelling of --adapter."),
    node_url: str = NodeUrlOption,
    lane: int = typer.Option(0, min=0, max=2**32 - 1, help="Payment lane (parallel clients use different ones)."),
    max_tokens: int = typer.Option(64, min=1, help="The most tokens to generate; the voucher covers exactly "
                                                   "what the node holds for this prompt and max_tokens."),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0, help="Sampling temperature (0: greedy)."),
    chat: bool = typer.Option(False, "--chat", help="Use /v1/chat/completions."),
    key_file: Path = KeyFileOption, dev_account: int = DevAccountOption,
) -> None:
    """Send one paid request with the OpenAI client; print the answer and its receipt.

    Signs a voucher for the exact body (from --key-file, LORANODE_ACCOUNT_KEY or --dev-account) and
    checks the receipt the node signs."""
    from node.client.payer import Payer

    adapter = adapter or model
    if adapter is None:
        raise ConfigError("pass --adapter ID (the adapter to answer with; GET /v1/models lists them)")
    node_url = node_url.rstrip("/")
    key = signing_key(key_file, dev_account, lambda: Payer("0x" + "11" * 32, node_url).info.chain_id)
    payer = Payer(key, node_url)
    payer.info  # noqa: B018 -- the node answers before anything is signed (or says why not)
    out, text = _send(payer.openai(lane=lane), node_url, chat, adapter, prompt,
                      max_tokens=max_tokens, temperature=temperature)
    _print_answer(payer, out, text, lane)


def _send(client: Any, node_url: str, chat: bool, adapter: str, prompt: str, **params: Any) -> tuple[Any, str]:
    """The answer and its text; the node's refusal (its code and message) or NodeUnreachable."""
    import openai

    try:
        if chat:
            out = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": prompt}],
                                                 **params)
            return out, out.choices[0].message.content
        out = client.completions.create(model=adapter, prompt=prompt, **params)
        return out, out.choices[0].text
    except openai.APIStatusError as exc:
        raise refusal(exc.status_code, exc.response.text, node_url) from exc
    except openai.APIConnectionError as exc:
        cause = exc.__cause__
        if isinstance(cause, NodeError):  # from the payer's own calls to the node, in its hook
            raise cause from exc
        raise NodeUnreachable(node_url, str(cause or exc)) from exc


def _print_answer(payer: Any, out: Any, text: str, lane: int) -> None:
    from node.client.payer import verify_receipt

    receipt = (out.model_extra or {})["receipt"]
    signer = verify_receipt(receipt, payer.info.domain)
    console.print(text, markup=False, highlight=False)
    console.print(json.dumps(receipt, indent=2), style="dim", markup=False, highlight=False)
    ok = signer.lower() == payer.info.node.lower()
    console.print(f"receipt signed by {signer}: {'the node, verified' if ok else 'NOT the node'}; "
                  f"lane {lane} charged total {receipt['chargedTotal']}")
    if not ok:
        raise typer.Exit(1)
