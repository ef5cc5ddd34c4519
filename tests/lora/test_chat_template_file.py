"""An adapter's own chat template: fetched with it (local or http), read as a bounded plain string, known
to the store once the adapter is loaded, and refused (never swapped for another) when malformed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.errors import AdapterFormatError, AdapterTooLarge
from node.lora.chat_template_file import MAX_TEMPLATE_CHARS, MAX_TEMPLATE_FILE_BYTES, read_chat_template
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import AdapterHTTPServer, adapter_nbytes, make_adapter, parse_adapter

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AdapterHTTPServer]:
    root = tmp_path / "served"
    root.mkdir()
    with AdapterHTTPServer(root) as s:
        yield s


def _store(tmp_path: Path) -> AdapterStore[Any]:
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=1 << 20, max_disk_bytes=1 << 22,
                         retry_after_s=0.0, http_timeout_s=2.0)
    return AdapterStore(config, parse_adapter, adapter_nbytes)


def test_a_folder_without_template_files_has_none(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a")
    assert read_chat_template(tmp_path / "a") is None


def test_chat_template_jinja_comes_before_tokenizer_config(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a")
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from the config"}))
    assert read_chat_template(tmp_path / "a") == "from the config"
    (tmp_path / "a" / "chat_template.jinja").write_text(TEMPLATE)
    assert read_chat_template(tmp_path / "a") == TEMPLATE


def test_named_templates_in_tokenizer_config_give_the_default_one(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a")
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "x": 1}))
    assert read_chat_template(tmp_path / "a") == TEMPLATE
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4}))
    assert read_chat_template(tmp_path / "a") is None


@pytest.mark.parametrize(("name", "content", "match"), [
    ("chat_template.jinja", "x" * (MAX_TEMPLATE_CHARS + 1), "characters, over"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "not UTF-8"),
    ("tokenizer_config.json", "{not json", "not JSON"),
    ("tokenizer_config.json", json.dumps({"chat_template": {"a": 1}}), "not a string"),
    ("tokenizer_config.json", " " * (MAX_TEMPLATE_FILE_BYTES + 1), "bytes, over"),
])
def test_a_malformed_template_is_refused_not_replaced(tmp_path: Path, name: str, content: str | bytes,
                                                      match: str) -> None:
    make_adapter(tmp_path / "a")
    path = tmp_path / "a" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AdapterFormatError, match=match):
        read_chat_template(tmp_path / "a")


def test_the_store_knows_a_local_adapters_template_once_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    digest = make_adapter(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    with _store(tmp_path) as store:
        store.register("a", AdapterSource(str(folder), digest))
        assert store.chat_template("a") is None  # not loaded yet
        store.prefetch("a").result()
        assert store.chat_template("a") == TEMPLATE
        (folder / "chat_template.jinja").write_text("changed at the source")  # the fetched copy is what counts
        store.register("a", AdapterSource(str(folder), digest))
        store.get("a")
        assert store.chat_template("a") == TEMPLATE
        store.unregister("a")
        assert store.chat_template("a") is None


def test_the_store_fetches_the_template_over_http_and_treats_404_as_none(tmp_path: Path,
                                                                         server: AdapterHTTPServer) -> None:
    with _store(tmp_path) as store:
        for name, template in (("with", TEMPLATE), ("without", None)):
            digest = make_adapter(server.root / name)
            if template is not None:
                (server.root / name / "chat_template.jinja").write_text(template)
            store.register(name, AdapterSource(f"{server.url}/{name}", digest))
            store.get(name)
            assert store.chat_template(name) == template
        assert server.requests["/without/chat_template.jinja"] == 1


def test_an_oversized_template_file_at_the_source_fails_the_load(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    digest = make_adapter(folder)
    (folder / "tokenizer_config.json").write_bytes(b" " * (MAX_TEMPLATE_FILE_BYTES + 1))
    with _store(tmp_path) as store:
        store.register("a", AdapterSource(str(folder), digest))
        with pytest.raises(AdapterTooLarge):
            store.get("a")
        assert store.state("a") is LoadState.FAILED
