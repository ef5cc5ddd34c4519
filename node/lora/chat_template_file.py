"""An adapter's own chat template, read from its folder as a plain string (never rendered here).

A PEFT folder may carry the chat format it was trained with, as transformers saves it: a
`chat_template.jinja` file, or a `chat_template` entry in `tokenizer_config.json` (a string, or a list
of named templates of which `default` is used). These files are optional, are not part of the
registered weights hash (DESIGN.md: the hash covers `adapter_config.json` and
`adapter_model.safetensors`), and come from the adapter's owner: they are bounded in bytes, decoded
strictly, and a malformed one is an AdapterFormatError, never silently replaced by the base model's.
Rendering happens in the API, in transformers' jinja sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

from node.errors import AdapterFormatError

JINJA_FILE, TOKENIZER_CONFIG_FILE = "chat_template.jinja", "tokenizer_config.json"
TEMPLATE_FILES = (JINJA_FILE, TOKENIZER_CONFIG_FILE)  # fetched with the adapter when its source has them
MAX_TEMPLATE_FILE_BYTES = 1 << 20  # each; a tokenizer_config.json lists added tokens too
MAX_TEMPLATE_CHARS = 64 << 10  # the template itself


def read_chat_template(folder: Path) -> str | None:
    """The adapter's chat template, or None when its folder has none."""
    jinja = _read(folder / JINJA_FILE)
    if jinja:  # an empty file is no template (a server that answers 200 with nothing for a missing one)
        return _bounded(jinja, JINJA_FILE)
    config_text = _read(folder / TOKENIZER_CONFIG_FILE)
    if not config_text:
        return None
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"the adapter's {TOKENIZER_CONFIG_FILE} is not JSON: {exc}") from exc
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise AdapterFormatError(f"the adapter's {TOKENIZER_CONFIG_FILE} has a chat_template that is not a string")
    return _bounded(template, TOKENIZER_CONFIG_FILE)


def _read(path: Path) -> str | None:
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_TEMPLATE_FILE_BYTES:
        raise AdapterFormatError(f"the adapter's {path.name} is {size} bytes, over {MAX_TEMPLATE_FILE_BYTES}",
                                 nbytes=size, max_bytes=MAX_TEMPLATE_FILE_BYTES)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"the adapter's {path.name} is not UTF-8") from exc


def _bounded(template: str, where: str) -> str:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise AdapterFormatError(f"the adapter's chat template ({where}) is {len(template)} characters, over "
                                 f"{MAX_TEMPLATE_CHARS}", num_chars=len(template), max_chars=MAX_TEMPLATE_CHARS)
    if not template.strip():
        raise AdapterFormatError(f"the adapter's chat template ({where}) is empty")
    return template
