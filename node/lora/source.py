"""An adapter's registered URI, fetched into a folder: a local path, file://, http(s)://, or a private
source, s3:// or hf:// (private_source.py: credentials from the node's environment, never the URI).

The adapter at a URI is a PEFT folder; only two files of it are ever read as weights:
`adapter_config.json` and `adapter_model.safetensors` (for http(s), `<uri>/adapter_config.json` and
`<uri>/adapter_model.safetensors`), plus, when the source has them, the adapter's chat template files
(`chat_template.jinja`, `tokenizer_config.json`: bounded, outside the weights hash, see
chat_template_file.py; over http a 403/404/410 means "none"). Pickled weights (`adapter_model.bin`,
`*.pt`, ...) are refused, and so is a "safetensors" file whose bytes are a pickle or a torch.save zip:
nothing here or later ever unpickles. Downloads ask for identity bytes and refuse a compressed answer
(no decompression bomb can expand here). They are streamed in chunks, hashed while written, bounded in
bytes, and bounded in time three ways: the connect timeout, the read timeout (the longest silence
between two chunks), and a deadline for the whole adapter (a server that trickles a byte per second
never finishes).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

import httpx

from node.errors import AdapterFormatError, AdapterSourceError, AdapterTooLarge
from node.lora.adapter_files import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterFiles, parse_safetensors_header
from node.lora.chat_template_file import MAX_TEMPLATE_FILE_BYTES, TEMPLATE_FILES
from node.lora.content_hash import ADAPTER_FILES, CHUNK_BYTES, folder_digest
from node.lora.private_source import PRIVATE_SCHEMES, SignedGet, file_request

ABSENT_STATUSES = (403, 404, 410)  # an optional file the source does not have (S3 says 403)


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
    if parsed.scheme in ("http", "https", *PRIVATE_SCHEMES):
        budget, digests = limits.max_bytes, []
        for name in ADAPTER_FILES:
            get = _file_get(uri, name)
            digest, size = _download(client, get.url, dest / name, budget, deadline, limits, get.headers)
            digests.append((name, digest))
            budget -= size
        for name in TEMPLATE_FILES:
            get = _file_get(uri, name)
            try:
                _download(client, get.url, dest / name, MAX_TEMPLATE_FILE_BYTES, deadline, limits, get.headers)
            except AdapterSourceError as exc:
                (dest / name).unlink(missing_ok=True)
                if exc.facts.get("http_status") not in ABSENT_STATUSES:
                    raise
        return folder_digest(digests)
    src = local_path(uri)
    digest = _copy_local(src, dest, limits.max_bytes)
    _copy_templates(src, dest)
    return digest


def _file_get(uri: str, name: str) -> SignedGet:
    """The GET of one file of the adapter at `uri` (signed or with a token for a private source)."""
    parsed = urlparse(uri)
    if parsed.scheme in PRIVATE_SCHEMES:
        return file_request(uri, name)
    return SignedGet(urlunparse(parsed._replace(path=f"{parsed.path.rstrip('/')}/{name}")), {})  # keeps a ?query


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
    AdapterFiles.read(folder).check()


def check_safetensors(path: Path) -> None:
    """The file must be a safetensors file whose tensors tile its data exactly."""
    parse_safetensors_header(path.name, path.read_bytes())


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


def _copy_templates(src: Path, dest: Path) -> None:
    """The adapter's chat template files, where it has them (bounded; a larger one is refused)."""
    for name in TEMPLATE_FILES:
        path = src / name
        if not path.is_file():
            continue
        with open(path, "rb") as fin:
            data = fin.read(MAX_TEMPLATE_FILE_BYTES + 1)  # a file growing meanwhile is still bounded
        if len(data) > MAX_TEMPLATE_FILE_BYTES:
            raise AdapterTooLarge(f"the adapter's {name} is over {MAX_TEMPLATE_FILE_BYTES} bytes", uri=str(src),
                                  max_bytes=MAX_TEMPLATE_FILE_BYTES)
        (dest / name).write_bytes(data)


def _download(client: httpx.Client, url: str, path: Path, budget: int, deadline: float,
              limits: FetchLimits, headers: dict[str, str] | None = None) -> tuple[bytes, int]:
    digest, size, url_or_token = hashlib.sha256(), 0, url
    url = shown_uri(url_or_token)
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    try:
        with client.stream("GET", url_or_token, timeout=timeout,
                           headers={**(headers or {}), "Accept-Encoding": "identity"}
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
