"""Private adapter sources: an S3-compatible bucket (`s3://bucket/prefix`) and a Hugging Face hub
style repository (`hf://owner/name[@revision][/subfolder]`), each file fetched as an HTTP GET that
`source.py` streams, bounds and hashes exactly as it does a public https:// source.

Credentials never appear in the registered URI (it is public, on chain): they come from the node's
environment. S3: the standard AWS chain as botocore resolves it (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a shared credentials file, an instance role), the region
from AWS_REGION (default us-east-1), and LORANODE_S3_ENDPOINT_URL for a non-AWS service (MinIO, R2,
...). Each GET is signed with SigV4 (path-style addressing). HF: LORANODE_HF_TOKEN_FILE (or HF_TOKEN)
as a bearer token, LORANODE_HF_ENDPOINT (default https://huggingface.co); files are read from
`<endpoint>/<owner>/<name>/resolve/<revision>/<subfolder>/<file>`, revision `main` by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from node.errors import AdapterSourceError

PRIVATE_SCHEMES = ("s3", "hf")
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class SignedGet:
    url: str
    headers: dict[str, str]


def file_request(uri: str, name: str) -> SignedGet:
    """The GET that fetches file `name` of the adapter at the private `uri`."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3_get(parsed.netloc, parsed.path.strip("/"), name, uri)
    if parsed.scheme == "hf":
        return _hf_get(parsed.netloc + parsed.path, name, uri)
    raise AdapterSourceError(f"not a private adapter source: {uri}", uri=uri)


def _s3_get(bucket: str, prefix: str, name: str, uri: str) -> SignedGet:
    from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.session import get_session  # type: ignore[import-untyped]

    if not bucket:
        raise AdapterSourceError(f"no bucket in {uri} (s3://bucket/prefix)", uri=uri)
    credentials = get_session().get_credentials()
    if credentials is None:
        raise AdapterSourceError(f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or a shared credentials file)", uri=uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = os.environ.get("LORANODE_S3_ENDPOINT_URL") or f"https://s3.{region}.amazonaws.com"
    key = f"{prefix}/{name}" if prefix else name
    url = f"{endpoint.rstrip('/')}/{quote(bucket)}/{quote(key)}"
    request = AWSRequest(method="GET", url=url, headers={"Accept-Encoding": "identity"})
    S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(request)
    return SignedGet(url, dict(request.headers.items()))


def _hf_get(repo_path: str, name: str, uri: str) -> SignedGet:
    parts = repo_path.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise AdapterSourceError(f"no owner/name in {uri} (hf://owner/name[@revision][/subfolder])", uri=uri)
    owner, repo = parts[0], parts[1]
    repo, _, revision = repo.partition("@")
    subfolder = "/".join(parts[2:])
    endpoint = os.environ.get("LORANODE_HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    path = "/".join(p for p in (subfolder, name) if p)
    url = f"{endpoint.rstrip('/')}/{owner}/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(path)}"
    token = _hf_token()
    return SignedGet(url, {"Authorization": f"Bearer {token}"} if token else {})


def _hf_token() -> str | None:
    path = os.environ.get("LORANODE_HF_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise AdapterSourceError(f"cannot read LORANODE_HF_TOKEN_FILE {path}: {exc}", path=path) from exc
    return os.environ.get("HF_TOKEN") or None
