"""A JSONResponse rendered by node/json_codec.py (the paid answers: their bodies carry the text and the
receipt, and starlette's renders them with the standard library)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from node.json_codec import dumps


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)
