"""`loranode model id|make-tiny`: the base model a node serves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from node.cli.console import console
from node.errors import ModelFormatError

if TYPE_CHECKING:  # torch and transformers load only in the command that uses them (start-up time)
    from node.devkit.tiny_model import Arch

app = typer.Typer(help="Base models: their registry id, and a tiny one for trying things out.", no_args_is_help=True)
CLI_ARCHS: dict[str, Arch] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}  # what make-tiny offers


@app.command("id")
def model_id(folder: Path = typer.Argument(..., help="A Hugging Face model folder (config.json + safetensors)."),
             ) -> None:
    """Print the base model id adapters register against (the folder hash rule)."""
    from node.lora.content_hash import base_model_id, base_model_names
    from node.protocol.hexstr import to_hex

    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder} has no config.json: not a Hugging Face model folder", folder=str(folder))
    names = base_model_names(folder)
    console.print(to_hex(base_model_id(folder)))
    console.print(f"over {len(names)} files: {', '.join(names)}", style="dim")


@app.command("make-tiny")
def make_tiny(folder: Path = typer.Argument(..., help="Where to write the model."),
              arch: str = typer.Option("llama", help="llama, mistral or qwen2."),
              seed: int = typer.Option(0, help="Random seed of the weights.")) -> None:
    """Write a tiny random Llama-family model with a trained tokenizer (demo, tests)."""
    from node.devkit import make_tiny_model
    from node.lora.content_hash import base_model_id
    from node.protocol.hexstr import to_hex

    if arch not in CLI_ARCHS:
        raise typer.BadParameter("arch must be llama, mistral or qwen2", param_hint="--arch")
    path = make_tiny_model(folder, arch=CLI_ARCHS[arch], seed=seed)
    console.print(f"wrote {path} (base model id {to_hex(base_model_id(path))})")
