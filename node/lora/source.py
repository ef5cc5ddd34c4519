"""An adapter's registered URI, fetched into a folder: a local path, file://, or http(s)://.

The adapter at a URI is a PEFT folder; only two files of it are ever read: `adapter_config.json`
and `adapter_model.safetensors` (for http(s), `<uri>/adapter_config.json` and
`<uri>/adapter_model.safetensors`). Pickled weights (`adapter_model.bin`, `*.pt`, ...) are refused,
and so is a "safetensors" file whose bytes are a pickle or a torch.save zip: nothing here or later
ever unpickles. Downloads ask for identity bytes and refuse a compressed answer (no decompression
bomb can expand here). They are streamed in chunks, hashed while written, bounded in bytes, and bounded
in time three ways: the connect timeout, the read timeout (the longest silence between two chunks),
and a deadline for the whole adapter (a server that trickles a byte per second never finishes).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

import httpx

from node.errors import AdapterFormatError, AdapterSourceError, AdapterTooLarge
from node.lora.content_hash import ADAPTER_FILES, CHUNK_BYTES, folder_digest

CONFIG_FILE, WEIGHTS_FILE = ADAPTER_FILES
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int  # both files together
    connect_timeout_s: float
    read_timeout_s: float  # the longest silence between two chunks
    deadline_s: float  # the whole adapter, however fast each chunk comes


def fetch_adapter(uri: str, dest: Path, limits: FetchLimits, client: httpx.Client) -> bytes:
    """Copy the adapter at `uri` into the empty folder `dest`; returns its weights hash (32 bytes).

    Raises AdapterSourceError (missing, HTTP status, timeout), AdapterTooLarge, AdapterFormatError.
    """
    parsed = urlparse(uri)
    deadline = time.monotonic() + limits.deadline_s
    if parsed.scheme in ("http", "https"):
        budget, digests = limits.max_bytes, []
        for name in ADAPTER_FILES:
            url = urlunparse(parsed._replace(path=f"{parsed.path.rstrip('/')}/{name}"))  # keeps a ?query
            digest, size = _download(client, url, dest / name, budget, deadline, limits)
            digests.append((name, digest))
            budget -= size
        return folder_digest(digests)
    return _copy_local(local_path(uri), dest, limits.max_bytes)


def shown_uri(uri: str) -> str:
    """The URI as errors and logs may show it: without user:password@ or a ?query (tokens live there)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return uri
    return urlunparse(parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment=""))


def local_path(uri: str) -> Path:
    """The folder a plain path or a file:// URI names; AdapterSourceError for any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise AdapterSourceError(f"file:// URI on another host: {uri}", uri=uri)
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" style drive letters are paths
        raise AdapterSourceError(f"unsupported adapter URI scheme {parsed.scheme!r}", uri=uri)
    return Path(uri).expanduser()


def check_adapter_files(folder: Path) -> None:
    """Refuse a folder whose config is not a JSON object or whose weights are not safetensors."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not JSON: {e}", file=CONFIG_FILE) from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object", file=CONFIG_FILE)
    check_safetensors(folder / WEIGHTS_FILE)


def check_safetensors(path: Path) -> None:
    """Read only the header: it must be a safetensors header whose tensors tile the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
            raise AdapterFormatError(_not_safetensors(head), file=path.name, size=size)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path.name}: corrupted safetensors header ({e})", file=path.name) from e
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path.name}: corrupted safetensors header", file=path.name)
    _check_tensor_layout(path.name, header, size - 8 - header_len)


def _check_tensor_layout(name: str, header: dict[str, object], data_bytes: int) -> None:
    end_max = 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
            dims = [int(d) for d in shape]
            ok = (min(dims, default=0) >= 0 and 0 <= begin <= end <= data_bytes
                  and end - begin == math.prod(dims) * _DTYPE_BYTES[dtype])
        except (TypeError, KeyError, ValueError) as e:
            raise AdapterFormatError(f"{name}: bad entry for tensor {tensor}", file=name,
                                     tensor=tensor) from e
        if not ok:
            raise AdapterFormatError(f"{name}: tensor {tensor} does not fit the file (truncated or "
                                     "corrupted)", file=name, tensor=tensor, data_bytes=data_bytes)
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise AdapterFormatError(f"{name}: {data_bytes - end_max} bytes after the last tensor",
                                 file=name, data_bytes=data_bytes)


def _not_safetensors(head: bytes) -> str:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{WEIGHTS_FILE} is a Python pickle; only safetensors are read"
    if head[:4] == b"PK\x03\x04":
        return f"{WEIGHTS_FILE} is a torch.save zip (pickle inside); only safetensors are read"
    return f"{WEIGHTS_FILE} is not a safetensors file (corrupted or truncated header)"


def _copy_local(src: Path, dest: Path, max_bytes: int) -> bytes:
    if not src.is_dir():
        raise AdapterSourceError(f"no adapter folder at {src}", uri=str(src))
    if not (src / WEIGHTS_FILE).is_file():
        pickled = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterFormatError(f"pickled weights {pickled} refused; only {WEIGHTS_FILE} is read",
                                     uri=str(src), files=pickled)
        raise AdapterSourceError(f"{src} has no {WEIGHTS_FILE}", uri=str(src))
    if not (src / CONFIG_FILE).is_file():
        raise AdapterSourceError(f"{src} has no {CONFIG_FILE}", uri=str(src))
    total = sum((src / name).stat().st_size for name in ADAPTER_FILES)
    if total > max_bytes:
        raise AdapterTooLarge(f"adapter at {src} is {total} bytes, over the {max_bytes}-byte limit",
                              uri=str(src), nbytes=total, max_bytes=max_bytes)
    digests = []
    for name in ADAPTER_FILES:
        digest = hashlib.sha256()
        with open(src / name, "rb") as fin, open(dest / name, "wb") as fout:
            while chunk := fin.read(CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
        digests.append((name, digest.digest()))
    return folder_digest(digests)


def _download(client: httpx.Client, url: str, path: Path, budget: int, deadline: float,
              limits: FetchLimits) -> tuple[bytes, int]:
    digest, size, url_or_token = hashlib.sha256(), 0, url
    url = shown_uri(url_or_token)
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    try:
        with client.stream("GET", url_or_token, timeout=timeout, headers={"Accept-Encoding": "identity"}
                           ) as response, open(path, "wb") as out:
            _check_response(response, url, budget, limits.max_bytes)
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > budget:
                    raise AdapterTooLarge(f"{url} passed the {limits.max_bytes}-byte adapter limit",
                                          uri=url, max_bytes=limits.max_bytes)
                if time.monotonic() > deadline:
                    raise AdapterSourceError(
                        f"{url} too slow: {size} bytes by the {limits.deadline_s}s deadline",
                        uri=url, nbytes=size, deadline_s=limits.deadline_s)
                digest.update(chunk)
                out.write(chunk)
    except httpx.TimeoutException as e:
        raise AdapterSourceError(f"{url} timed out ({type(e).__name__}) after {size} bytes",
                                 uri=url, nbytes=size) from e
    except httpx.HTTPError as e:
        raise AdapterSourceError(f"{url} failed: {type(e).__name__}: {e}", uri=url) from e
    return digest.digest(), size


def _check_response(response: httpx.Response, url: str, budget: int, max_bytes: int) -> None:
    if response.status_code != 200:
        raise AdapterSourceError(f"GET {url} answered {response.status_code}", uri=url,
                                 http_status=response.status_code)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # never decompressed here: a gzip bomb expands 1000x per network read
        raise AdapterSourceError(f"GET {url} answered with Content-Encoding {encoding!r}; adapters are "
                                 "fetched as identity bytes (Accept-Encoding: identity)", uri=url, encoding=encoding)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > budget:
        raise AdapterTooLarge(f"{url} is {declared} bytes, over what is left ({budget}) of the "
                              f"{max_bytes}-byte adapter limit", uri=url, nbytes=int(declared),
                              max_bytes=max_bytes)
