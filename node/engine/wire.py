"""The messages between the API process and its engine core processes, and their msgpack encoding.

Two directions, one ZeroMQ PUSH/PULL pair each (see `core_process.py`):

    API -> core   AddRequest, AbortRequest, RegisterAdapter, RemoveAdapter, PrefetchAdapter, ControlAdapter,
                  ReportMetrics, Shutdown
    core -> API   Ready (once, on start), Outputs (once per engine step), AdapterLoaded (per prefetch),
                  AdapterControlled (per ControlAdapter, once it took effect), Metrics (about once a
                  second, also the core's heartbeat, and at once in answer to ReportMetrics)

Each frame is one msgpack message tagged with its type's name. `SamplingParams`, `StreamDelta` and
`RequestOutput` cross as the engine's own dataclasses, field by field (msgspec encodes and decodes
dataclasses, running `__post_init__`): a field added to one of them crosses without a change here.
A `NodeError` crosses as its class name, message and facts, and is raised on the other side as the
same class. Anything that is not a well-formed message (wrong type, bad field, invalid params) is
refused by `decode` with `MalformedMessage`; the receiving side logs it and goes on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from node.engine.sampling import SamplingParams
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import NodeError
from node.lora.manager import AdapterAction

MAX_FRAME_BYTES = 64 << 20  # a larger frame is refused by the socket itself (ZMQ_MAXMSGSIZE)


class MalformedMessage(Exception):
    """A frame that is not a message of the wire format; the receiver drops it."""


class _Message(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Each message says frozen=True again: msgspec inherits it, a type checker does not."""


# --- API -> core --------------------------------------------------------------------------------------
class AddRequest(_Message, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    is_streamed: bool  # every delta, or the final output only
    incarnation: int  # of the core it was sent to: a restarted core drops what was meant for the last one
    prefix_key: str | None = None  # the n choices of one prompt share its KV blocks (LLMEngine.add_request)


class AbortRequest(_Message, frozen=True):
    request_id: str


class RegisterAdapter(_Message, frozen=True):
    adapter_id: str
    uri: str
    sha256: str
    is_pinned: bool = False


class RemoveAdapter(_Message, frozen=True):
    adapter_id: str


class PrefetchAdapter(_Message, frozen=True):
    adapter_id: str


class ControlAdapter(_Message, frozen=True):
    adapter_id: str
    action: AdapterAction  # crosses as its value: "pin", "unpin", "preload" or "evict"
    control_id: int = 0  # the core answers it with AdapterControlled


class ReportMetrics(_Message, frozen=True):
    report_id: int  # the core answers with Metrics carrying it (figures read after everything sent before)


class Shutdown(_Message, frozen=True):
    pass


# --- core -> API --------------------------------------------------------------------------------------
class Ready(_Message, frozen=True):
    core: int  # its index among the data-parallel cores
    incarnation: int
    pid: int
    max_model_len: int


class Outputs(_Message, frozen=True):
    """One engine step's results for one core: deltas of streamed requests, whole outputs of the rest."""

    core: int
    incarnation: int
    deltas: list[StreamDelta]
    finished: list[RequestOutput]


class AdapterLoaded(_Message, frozen=True):
    """A core's answer to PrefetchAdapter: the adapter is in its host memory (with the chat template its
    folder has, None if none), or its load failed with `error`."""

    core: int
    incarnation: int
    adapter_id: str
    chat_template: str | None
    error: NodeError | None = None


class AdapterControlled(_Message, frozen=True):
    """A ControlAdapter took effect (or was refused: a second pin that would leave no slot for traffic)."""

    core: int
    incarnation: int
    control_id: int
    error: NodeError | None = None


class Metrics(_Message, frozen=True):
    core: int
    incarnation: int
    num_running: int
    num_waiting: int
    adapter_store: dict[str, dict[str, float]]  # tier -> stat -> value (AdapterStore.metrics, and "device")
    engine: dict[str, float] = {}  # node/engine/stats.py: engine_stats
    num_refused: int = 0  # frames the core refused since it started
    report_id: int = 0  # the last ReportMetrics the core had read


ToCore = (AddRequest | AbortRequest | RegisterAdapter | RemoveAdapter | PrefetchAdapter | ControlAdapter
          | ReportMetrics | Shutdown)
FromCore = Ready | Outputs | AdapterLoaded | AdapterControlled | Metrics


def _error_types() -> dict[str, type[NodeError]]:
    found: dict[str, type[NodeError]] = {}
    stack: list[type[NodeError]] = [NodeError]
    while stack:
        cls = stack.pop()
        found[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return found


def _enc_hook(obj: object) -> Any:
    if isinstance(obj, NodeError):
        return {"kind": type(obj).__name__, "message": obj.message, "facts": obj.to_dict()}
    # msgspec's hook protocol: NotImplementedError says "a type this wire does not carry", and the
    # encoder reports it as an encode error (never a missing feature)
    raise NotImplementedError(f"{type(obj).__name__} does not cross the engine's wire")


def _dec_hook(kind: type, obj: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, NodeError):
        if not (isinstance(obj, dict) and isinstance(obj.get("message"), str)):
            raise ValueError("an error must have a message")
        cls = _error_types().get(str(obj.get("kind")), NodeError)
        raw = obj.get("facts")
        facts = dict(raw) if isinstance(raw, dict) else {}
        facts = {k: v for k, v in facts.items() if k not in ("code", "message") and isinstance(k, str)}
        return cls(obj["message"], **facts)
    raise NotImplementedError(f"{kind} does not cross the engine's wire")  # msgspec's hook protocol, as above


class Codec:
    """Encodes what one side sends and decodes what it receives (one per socket direction)."""

    def __init__(self, receives: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoder = msgspec.msgpack.Decoder(receives, dec_hook=_dec_hook)

    def encode(self, message: _Message) -> bytes:
        return self._encoder.encode(message)

    def decode(self, frame: bytes | memoryview) -> Any:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, NodeError, ValueError, TypeError,
                RecursionError) as e:
            raise MalformedMessage(f"{type(e).__name__}: {e}"[:300]) from e


def core_codec() -> Codec:
    """What an engine core uses: decodes messages to cores."""
    return Codec(ToCore)


def api_codec() -> Codec:
    """What the API uses: decodes messages from cores."""
    return Codec(FromCore)
