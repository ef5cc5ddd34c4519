"""A request body read within a size limit: nobody makes the node hold more of a body than it would use."""

from __future__ import annotations

from fastapi import Request

from node.errors import RequestTooLarge


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body as sent, refused with 413 before any of it is read when its declared length passes
    `max_bytes`, and as soon as the bytes read pass it (a chunked body declares none): never read further."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge("request body too large", size=int(declared), max_size=max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge("request body too large", max_size=max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
