"""Adapter files that lie, read by the node: NaN/Inf weights, a config that lies about rank or target
modules (or whose patterns are not regexes), compression bombs, endless bodies and pickles over HTTP.
Each is refused with its typed error, alone: the store keeps serving the adapters it has.
(Wrong hashes, pickles on disk, oversized and corrupted files are in tests/lora.)"""

from __future__ import annotations

import json
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.errors import AdapterFormatError, AdapterSourceError, AdapterTooLarge
from node.lora.adapter import LoRATargetSpec, load_lora_adapter
from node.lora.provider import AdapterSource
from node.lora.store import AdapterStore, StoreConfig
from node.protocol.hexstr import to_hex
from tests.fixtures.adapters import adapter_nbytes, make_adapter, parse_adapter

TARGET = LoRATargetSpec.of(2, {m: (64, 64) for m in ("q_proj", "k_proj", "v_proj", "o_proj")})
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _rewrite_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def _problems(folder: Path) -> list[str]:
    with pytest.raises(AdapterFormatError) as caught:
        load_lora_adapter(folder, TARGET, max_rank=16)
    return caught.value.facts["problems"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_with_nan_or_inf_are_refused(tmp_path: Path, value: float) -> None:
    make_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 2] = value
    save_file(tensors, tmp_path / WEIGHTS)
    assert _problems(tmp_path) == ["layers.1.v_proj: weights contain NaN or Inf"]


def test_huge_finite_weights_whose_sum_overflows_are_not_mistaken_for_inf(tmp_path: Path) -> None:
    make_adapter(tmp_path)  # the check sums each stack first; an overflowing sum is searched exactly
    tensors = load_file(tmp_path / WEIGHTS)
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    b[:4, 0] = 1.0e38  # four of them sum past float32's largest value (3.4e38)
    save_file(tensors, tmp_path / WEIGHTS)
    weights = load_lora_adapter(tmp_path, TARGET, max_rank=16)
    assert torch.isfinite(weights.modules[(1, "v_proj")][1]).all()


def test_a_weight_that_the_lora_scaling_overflows_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path, rank=4)
    _rewrite_config(tmp_path, lora_alpha=16)  # scale 16 / 4 = 4
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = 1.0e38
    save_file(tensors, tmp_path / WEIGHTS)
    assert _problems(tmp_path) == ["layers.0.q_proj: weights contain NaN or Inf"]


def test_a_config_that_lies_about_the_rank_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path, rank=4)
    _rewrite_config(tmp_path, r=8, lora_alpha=16)  # peft would scale by 16 / 8, the weights are rank 4
    problems = _problems(tmp_path)
    assert len(problems) == 4 and all("rank 4 but the config declares r=8" in p for p in problems)
    _rewrite_config(tmp_path, r=4, rank_pattern={"v_proj": 2})
    assert all("v_proj" in p and "r=2" in p for p in _problems(tmp_path))


def test_a_config_that_lies_about_the_target_modules_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path, modules=("q_proj", "v_proj"))
    _rewrite_config(tmp_path, target_modules=["q_proj", "k_proj"])
    problems = _problems(tmp_path)
    assert any("layers.0.v_proj: has weights but is not in target_modules" in p for p in problems)
    assert any("target_modules ['k_proj'] declared but the file has no weights" in p for p in problems)
    _rewrite_config(tmp_path, target_modules=r".*\.q_proj")  # peft's regex form: full names
    assert all("v_proj" in p for p in _problems(tmp_path))
    _rewrite_config(tmp_path, target_modules="all-linear")
    assert len(load_lora_adapter(tmp_path, TARGET, max_rank=16).modules) == 4


@pytest.mark.parametrize("changes, named", [
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"alpha_pattern": {"[": 4}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),  # json.loads reads NaN
    ({"r": 0}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
])
def test_config_values_that_are_not_what_they_claim_are_refused(tmp_path: Path, changes: dict[str, Any],
                                                                named: str) -> None:
    make_adapter(tmp_path)
    _rewrite_config(tmp_path, **changes)
    assert any(named in p for p in _problems(tmp_path))


def test_a_rank_zero_or_scalar_tensor_is_a_format_error(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors[f"{prefix}.q_proj.lora_A.weight"] = torch.zeros(0, 64)
    tensors[f"{prefix}.q_proj.lora_B.weight"] = torch.zeros(64, 0)
    tensors[f"{prefix}.v_proj.lora_A.weight"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / WEIGHTS)
    problems = _problems(tmp_path)
    assert any("layers.0.q_proj" in p and "do not fit" in p for p in problems)
    assert any("layers.0.v_proj" in p and "do not fit" in p for p in problems)


# --- over HTTP -----------------------------------------------------------------------------------
class HostileServer:
    """Serves `files` as they are, except: a path in `bombs` is an endless gzip or deflate stream of
    zeros (Content-Encoding set, ~1000x expansion), and a path in `endless` never ends."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.bombs: dict[str, str] = {}
        self.endless: set[str] = set()
        self._bombs: dict[str, tuple[bytes, bytes]] = {}
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def bomb_bytes(self, encoding: str) -> tuple[bytes, bytes]:
        """The stream's start, and a piece to repeat forever: each ~64 KiB piece inflates to 64 MiB of
        zeros (so one network read of it expands to 64 MiB). Built once, before memory is measured."""
        if encoding not in self._bombs:
            wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
            packer, zeros = zlib.compressobj(9, zlib.DEFLATED, wbits), b"\0" * (64 << 20)
            start = packer.compress(zeros) + packer.flush(zlib.Z_SYNC_FLUSH)
            self._bombs[encoding] = (start, packer.compress(zeros) + packer.flush(zlib.Z_SYNC_FLUSH))
        return self._bombs[encoding]

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def _handler(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            encoding = server.bombs.get(self.path)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.end_headers()
            try:
                if encoding:
                    self._bomb(encoding)
                elif self.path in server.endless:
                    while not server.stopping.is_set():
                        self.wfile.write(b"\0" * 65536)
                else:
                    self.wfile.write(server.files[self.path])
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up, as it should

        def _bomb(self, encoding: str) -> None:
            start, repeat = server.bomb_bytes(encoding)
            self.wfile.write(start)
            while not server.stopping.is_set():
                self.wfile.write(repeat)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.close()


def _store(tmp_path: Path, **overrides: Any) -> AdapterStore[Any]:
    config = StoreConfig(cache_dir=tmp_path / "cache", max_host_bytes=1 << 22, max_disk_bytes=1 << 24,
                         retry_after_s=0.0, http_timeout_s=5.0, **{"max_download_bytes": 1 << 20, **overrides})
    return AdapterStore(config, parse_adapter, adapter_nbytes)


def _serve(hostile: HostileServer, tmp_path: Path, name: str, seed: int = 0) -> str:
    folder = tmp_path / "src" / name
    sha = make_adapter(folder, seed=seed)
    for file in (WEIGHTS, CONFIG):
        hostile.files[f"/{name}/{file}"] = (folder / file).read_bytes()
    return sha


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compression_bomb_is_refused_unread(tmp_path: Path, hostile: HostileServer,
                                                                      encoding: str) -> None:
    with _store(tmp_path) as store:
        good_sha = _serve(hostile, tmp_path, "good")
        store.register("good", AdapterSource(f"{hostile.url}/good", good_sha))
        store.get("good")
        sha = _serve(hostile, tmp_path, "bomb", seed=1)  # another adapter (the disk cache is by content)
        hostile.bombs[f"/bomb/{WEIGHTS}"] = encoding
        hostile.bomb_bytes(encoding)
        store.register("bomb", AdapterSource(f"{hostile.url}/bomb", sha))
        tracemalloc.start()
        try:
            with pytest.raises(AdapterSourceError, match=f"Content-Encoding '{encoding}'"):
                store.get("bomb")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, f"peak {peak} bytes while refusing a bomb"
        assert len(store.disk_keys()) == 1  # the good adapter's copy; nothing of the bomb
        good = store.get("good")  # the store keeps serving what it has
        assert all(torch.equal(t, parse_adapter(tmp_path / "src" / "good")[k]) for k, t in good.items())


def test_an_endless_body_is_stopped_at_the_limit(tmp_path: Path, hostile: HostileServer) -> None:
    with _store(tmp_path) as store:
        sha = _serve(hostile, tmp_path, "endless")
        hostile.endless.add(f"/endless/{WEIGHTS}")
        store.register("endless", AdapterSource(f"{hostile.url}/endless", sha))
        with pytest.raises(AdapterTooLarge, match="passed the 1048576-byte adapter limit"):
            store.get("endless")
        assert store.disk_keys() == [] and list((tmp_path / "cache" / ".tmp").iterdir()) == []


def test_pickles_over_http_are_refused_and_never_unpickled(tmp_path: Path, hostile: HostileServer) -> None:
    import pickle

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path(tmp_path / "pwned").touch, ())

    payload = pickle.dumps({"weights": Boom()}, protocol=4)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / WEIGHTS).write_bytes(payload)
    (tmp_path / "evil" / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    from node.lora.content_hash import adapter_weights_sha256

    sha = to_hex(adapter_weights_sha256(tmp_path / "evil"))  # registered honestly: the bytes are what they are
    hostile.files.update({f"/evil/{WEIGHTS}": payload, f"/evil/{CONFIG}": (tmp_path / "evil" / CONFIG).read_bytes()})
    with _store(tmp_path) as store:
        store.register("evil", AdapterSource(f"{hostile.url}/evil", sha))
        with pytest.raises(AdapterFormatError, match="is a Python pickle"):
            store.get("evil")
    assert not (tmp_path / "pwned").exists()
