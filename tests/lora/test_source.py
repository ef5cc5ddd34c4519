"""Adapters from http(s) and local URIs: timeouts, deadlines, size limits, and what a file must look like."""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from node.errors import AdapterFormatError, AdapterIntegrityError, AdapterSourceError, AdapterTooLarge
from node.lora.chat_template_file import TEMPLATE_FILES
from node.lora.content_hash import ADAPTER_FILES
from node.lora.provider import AdapterSource, LoadState
from node.lora.source import check_adapter_files, check_safetensors, local_path
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import AdapterHTTPServer, adapter_nbytes, make_adapter, parse_adapter


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AdapterHTTPServer]:
    root = tmp_path / "served"
    root.mkdir()
    with AdapterHTTPServer(root) as s:
        yield s


def _store(tmp_path: Path, **overrides: Any) -> AdapterStore[Any]:
    defaults = {"max_host_bytes": 1 << 20, "max_disk_bytes": 1 << 22, "retry_after_s": 0.0,
                "http_timeout_s": 2.0}
    config = StoreConfig(cache_dir=tmp_path / "cache", **{**defaults, **overrides})
    return AdapterStore(config, parse_adapter, adapter_nbytes)


def _serve(server: AdapterHTTPServer, store: AdapterStore[Any], name: str, seed: int = 0) -> Path:
    folder = server.root / name
    store.register(name, AdapterSource(f"{server.url}/{name}/", make_adapter(folder, seed=seed)))
    return folder


def _same(weights: dict[str, torch.Tensor], folder: Path) -> bool:
    expected = parse_adapter(folder)
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_a_trickling_server_within_limits_is_fetched_once_for_many_prefetches(
        tmp_path: Path, server: AdapterHTTPServer) -> None:
    server.trickle_bytes, server.trickle_sleep_s = 2048, 0.02
    with _store(tmp_path) as store:
        folder = _serve(server, store, "a")
        futures = [store.prefetch("a") for _ in range(20)]
        assert store.state("a") is LoadState.LOADING
        assert all(f is futures[0] for f in futures)
        assert _same(futures[0].result(), folder)
        # the weights once each, and the optional chat template files asked once each (none here: 404)
        assert server.requests == {f"/a/{name}": 1 for name in ADAPTER_FILES + TEMPLATE_FILES}
        assert store.metrics().source.nbytes == sum((folder / n).stat().st_size for n in ADAPTER_FILES)


def test_an_http_error_names_the_status(tmp_path: Path, server: AdapterHTTPServer) -> None:
    with _store(tmp_path) as store:
        store.register("gone", AdapterSource(f"{server.url}/gone", "0x" + "11" * 32))
        with pytest.raises(AdapterSourceError, match="404") as caught:
            store.get("gone")
        assert caught.value.facts["http_status"] == 404


def test_credentials_in_a_uri_reach_the_server_but_never_an_error(
        tmp_path: Path, server: AdapterHTTPServer) -> None:
    with _store(tmp_path) as store:
        folder = server.root / "a"
        digest = make_adapter(folder)
        port = server.url.rsplit(":", 1)[1]
        base = f"http://me:pw-secret@127.0.0.1:{port}"
        store.register("a", AdapterSource(f"{base}/a/?token=q-secret", digest))
        assert _same(store.get("a"), folder)
        assert server.requests["/a/adapter_model.safetensors?token=q-secret"] == 1
        store.register("b", AdapterSource(f"{base}/b?token=q-secret", "22" * 32))
        with pytest.raises(AdapterSourceError, match="404") as caught:
            store.get("b")
        assert "secret" not in str(caught.value) and "secret" not in json.dumps(caught.value.to_dict())


def test_a_stalled_server_times_out(tmp_path: Path, server: AdapterHTTPServer) -> None:
    server.header_delay_s = 30
    with _store(tmp_path, http_timeout_s=0.3) as store:
        _serve(server, store, "a")
        started = time.monotonic()
        with pytest.raises(AdapterSourceError, match="timed out"):
            store.get("a")
        assert time.monotonic() - started < 10


def test_a_server_that_trickles_forever_hits_the_deadline(tmp_path: Path, server: AdapterHTTPServer) -> None:
    server.trickle_bytes, server.trickle_sleep_s = 64, 0.05  # every chunk in time, the whole in minutes
    with _store(tmp_path, fetch_deadline_s=0.5) as store:
        _serve(server, store, "a")
        started = time.monotonic()
        with pytest.raises(AdapterSourceError, match="deadline"):
            store.get("a")
        assert time.monotonic() - started < 10
        assert list((tmp_path / "cache" / ".tmp").iterdir()) == []


def test_a_slow_source_never_holds_up_adapters_already_on_this_node(
        tmp_path: Path, server: AdapterHTTPServer) -> None:
    with _store(tmp_path, num_fetch_workers=1, max_host_bytes=8192) as store:  # one adapter
        on_disk = _serve(server, store, "on_disk", seed=1)
        local = tmp_path / "local"
        store.register("local", AdapterSource(str(local), make_adapter(local, seed=2)))
        store.get("on_disk")
        store.get("local")  # on_disk is now only in the disk cache
        _serve(server, store, "slow1", seed=3)
        _serve(server, store, "slow2", seed=4)
        server.header_delay_s = 30
        slow = [store.prefetch("slow1"), store.prefetch("slow2")]  # one runs, one waits for the worker
        assert _same(store.get("on_disk"), on_disk)
        assert store.state("slow1") is LoadState.LOADING and store.state("slow2") is LoadState.LOADING
        store.unregister("slow1")
        store.unregister("slow2")
        server.stopping.set()  # let the stalled request end so that closing the store is quick
        for f in slow:
            f.exception()


def test_an_adapter_over_the_size_limit_is_refused_with_or_without_a_length(
        tmp_path: Path, server: AdapterHTTPServer) -> None:
    with _store(tmp_path, max_download_bytes=4096) as store:
        _serve(server, store, "a")
        with pytest.raises(AdapterTooLarge, match="4096"):
            store.get("a")
        server.send_length = False
        with pytest.raises(AdapterTooLarge, match="passed the 4096-byte"):
            store.get("a")
        assert store.disk_keys() == [] and list((tmp_path / "cache" / ".tmp").iterdir()) == []


def test_http_bytes_that_do_not_match_the_registry_are_refused(
        tmp_path: Path, server: AdapterHTTPServer) -> None:
    with _store(tmp_path) as store:
        folder = _serve(server, store, "a")
        make_adapter(folder, seed=1)  # the server's copy changed after registration
        with pytest.raises(AdapterIntegrityError) as caught:
            store.get("a")
        assert caught.value.facts["actual"] != caught.value.facts["expected"]
        assert store.disk_keys() == []


def test_uri_forms() -> None:
    assert local_path("/srv/a") == Path("/srv/a")
    assert local_path("file:///srv/my%20a") == Path("/srv/my a")
    assert local_path("file://localhost/srv/a") == Path("/srv/a")
    for uri in ("s3://bucket/a", "file://otherhost/srv/a"):
        with pytest.raises(AdapterSourceError):
            local_path(uri)


def _rewrite(path: Path, header: dict[str, Any], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_header_checks(tmp_path: Path) -> None:
    make_adapter(tmp_path / "good")
    check_adapter_files(tmp_path / "good")
    path = tmp_path / "x.safetensors"
    tensor = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    _rewrite(path, {"t": tensor}, b"\0" * 16)
    check_safetensors(path)
    cases = {
        "trailing": ({"t": tensor}, b"\0" * 17, "after the last tensor"),
        "short": ({"t": tensor}, b"\0" * 15, "does not fit"),
        "dtype": ({"t": {**tensor, "dtype": "F13"}}, b"\0" * 16, "bad entry"),
        "shape": ({"t": {**tensor, "shape": [-2, -2]}}, b"\0" * 16, "does not fit"),
        "overlap": ({"t": tensor, "u": {**tensor, "data_offsets": [16, 40]}}, b"\0" * 32, "does not fit"),
    }
    for name, (header, data, message) in cases.items():
        _rewrite(path, header, data)
        with pytest.raises(AdapterFormatError, match=message):
            check_safetensors(path)
        assert name
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(AdapterFormatError, match="not a safetensors"):
        check_safetensors(path)


def test_a_config_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    make_adapter(folder)
    for text in ("[1, 2]", "{not json"):
        (folder / "adapter_config.json").write_text(text)
        with pytest.raises(AdapterFormatError, match=r"adapter_config\.json"):
            check_adapter_files(folder)
    shutil.rmtree(folder)
