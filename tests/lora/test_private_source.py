"""Private adapter sources through the adapter store, as a node loads them: an S3-compatible bucket
(a real moto S3 server, every GET SigV4-signed) and a Hugging Face hub style repository behind a
bearer token; both streamed, size-limited and checked against the registered hash."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from node.chain.anvil import free_port
from node.errors import AdapterIntegrityError, AdapterSourceError, AdapterTooLarge
from node.lora.content_hash import ADAPTER_FILES
from node.lora.provider import AdapterSource
from node.lora.store import AdapterStore, StoreConfig
from tests.fixtures.adapters import adapter_nbytes, make_adapter, parse_adapter

HF_TOKEN = "hf_test_token_of_the_operator"


def _store(tmp_path: Path, **overrides: Any) -> AdapterStore[Any]:
    defaults = {"max_host_bytes": 1 << 20, "max_disk_bytes": 1 << 22, "retry_after_s": 0.0, "http_timeout_s": 5.0}
    return AdapterStore(StoreConfig(cache_dir=tmp_path / "cache", **{**defaults, **overrides}), parse_adapter,
                        adapter_nbytes)


def _same(weights: dict[str, torch.Tensor], folder: Path) -> bool:
    expected = parse_adapter(folder)
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in (("AWS_ACCESS_KEY_ID", "operator"), ("AWS_SECRET_ACCESS_KEY", "operator-secret"),
                        ("AWS_REGION", "us-east-1"), ("LORANODE_S3_ENDPOINT_URL", s3_endpoint)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"adapters-{free_port()}"
    s3.create_bucket(Bucket=name)
    return s3, name


def _upload(s3: Any, bucket: str, prefix: str, folder: Path) -> None:
    for name in ADAPTER_FILES:
        s3.upload_file(str(folder / name), bucket, f"{prefix}/{name}")


def test_an_adapter_in_a_private_bucket_loads_and_is_hash_checked(tmp_path: Path, bucket: Any) -> None:
    s3, name = bucket
    folder = tmp_path / "sea"
    sha = make_adapter(folder, seed=3)
    _upload(s3, name, "team/sea v1", folder)  # a key with a space: quoted in the signed URL
    with _store(tmp_path) as store:
        store.register("sea", AdapterSource(f"s3://{name}/team/sea v1", sha))
        assert _same(store.get("sea"), folder)
    other = tmp_path / "other"
    make_adapter(other, seed=4)
    _upload(s3, name, "team/sea v1", other)  # the bucket's copy changed after registration
    with _store(tmp_path / "again") as store:
        store.register("sea", AdapterSource(f"s3://{name}/team/sea v1", sha))
        with pytest.raises(AdapterIntegrityError):
            store.get("sea")


def test_a_bucket_adapter_over_the_size_limit_or_missing_or_without_credentials_is_refused(
        tmp_path: Path, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, name = bucket
    folder = tmp_path / "big"
    sha = make_adapter(folder, seed=5)
    _upload(s3, name, "big", folder)
    with _store(tmp_path, max_download_bytes=4096) as store:
        store.register("big", AdapterSource(f"s3://{name}/big", sha))
        with pytest.raises(AdapterTooLarge, match="4096"):
            store.get("big")
    with _store(tmp_path / "b") as store:
        store.register("gone", AdapterSource(f"s3://{name}/nothing-here", sha))
        with pytest.raises(AdapterSourceError) as caught:
            store.get("gone")
        assert caught.value.facts["http_status"] == 404
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with _store(tmp_path / "c") as store:
        store.register("big", AdapterSource(f"s3://{name}/big", sha))
        with pytest.raises(AdapterSourceError, match="no S3 credentials"):
            store.get("big")


class _Hub(ThreadingHTTPServer):
    """/<owner>/<name>/resolve/<revision>/<path>: files of `root/<revision>/<path>`, to the token only."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = root, list[str]()
        super().__init__(("127.0.0.1", 0), _HubHandler)


class _HubHandler(BaseHTTPRequestHandler):
    server: _Hub

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {HF_TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        owner, repo, resolve, revision, *rest = self.path.lstrip("/").split("/")
        path = self.server.root / revision / "/".join(rest)
        if (owner, repo, resolve) != ("team", "adapters", "resolve") or not path.is_file():
            self.send_response(404)
            self.end_headers()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Hub]:
    server = _Hub(tmp_path / "hub")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LORANODE_HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.shutdown()


def test_a_hub_adapter_at_a_revision_and_subfolder_loads_with_the_token_from_a_file(
        tmp_path: Path, hub: _Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = hub.root / "v2" / "sea"
    sha = make_adapter(folder, seed=6)
    token = tmp_path / "hf_token"
    token.write_text(HF_TOKEN + "\n")
    monkeypatch.setenv("LORANODE_HF_TOKEN_FILE", str(token))
    with _store(tmp_path) as store:
        store.register("sea", AdapterSource("hf://team/adapters@v2/sea", sha))
        assert _same(store.get("sea"), folder)
    assert "/team/adapters/resolve/v2/sea/adapter_model.safetensors" in hub.paths
    token.write_text("hf_someone_else")
    with _store(tmp_path / "b") as store:
        store.register("sea", AdapterSource("hf://team/adapters@v2/sea", sha))
        with pytest.raises(AdapterSourceError) as caught:
            store.get("sea")
        assert caught.value.facts["http_status"] == 401 and HF_TOKEN not in str(caught.value)
    with _store(tmp_path / "c", max_download_bytes=4096) as store:
        token.write_text(HF_TOKEN)
        store.register("sea", AdapterSource("hf://team/adapters@v2/sea", sha))
        with pytest.raises(AdapterTooLarge):
            store.get("sea")
