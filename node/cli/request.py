"""`loranode request`: one paid request, as a dApp would send it, with its receipt checked."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from node.cli.console import console
from node.cli.context import DevAccountOption, KeyFileOption, signing_key
from node.errors import PaymentError


def request(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
    model: str = typer.Option(..., "--model", help="The adapter id (see GET /v1/models)."),
    node_url: str = typer.Option("http://127.0.0.1:8000", "--node-url", help="The node's API."),
    lane: int = typer.Option(0, min=0, max=2**32 - 1, help="Payment lane (parallel clients use different ones)."),
    max_tokens: int = typer.Option(64, min=1), temperature: float = typer.Option(0.0, min=0.0, max=2.0),
    chat: bool = typer.Option(False, "--chat", help="Use /v1/chat/completions."),
    key_file: Path = KeyFileOption, dev_account: int = DevAccountOption,
) -> None:
    """Sign a voucher for the request, send it with the OpenAI client, print the answer and the receipt."""
    import openai

    from node.client.payer import Payer, verify_receipt

    probe = Payer("0x" + "11" * 32, node_url)
    key = signing_key(key_file, dev_account, probe.info.chain_id)
    payer = Payer(key, node_url)
    client = payer.openai(lane=lane)
    try:
        if chat:
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens, temperature=temperature)
            text = out.choices[0].message.content
        else:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                            temperature=temperature)
            text = out.choices[0].text
    except openai.APIStatusError as exc:
        raise PaymentError(f"the node refused the request ({exc.status_code})", body=exc.response.text[:500]) from exc
    receipt = (out.model_extra or {})["receipt"]
    signer = verify_receipt(receipt, payer.info.domain)
    console.print(text)
    console.print(json.dumps(receipt, indent=2), style="dim")
    ok = signer.lower() == payer.info.node.lower()
    console.print(f"receipt signed by {signer}: {'the node, verified' if ok else 'NOT the node'}; "
                  f"lane {lane} charged total {receipt['chargedTotal']}")
    if not ok:
        raise typer.Exit(1)
