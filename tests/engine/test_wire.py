"""The wire's typed messages: an adapter action crosses as its plain value and anything else is refused."""

from __future__ import annotations

import msgspec
import pytest

from node.engine import SamplingParams, wire
from node.engine.sampling import MAX_CACHE_SALT_LENGTH
from node.lora.manager import AdapterAction


def test_an_adapter_action_crosses_as_its_plain_string() -> None:
    frame = wire.api_codec().encode(wire.ControlAdapter("sea-r8", AdapterAction.PIN, 7))
    assert msgspec.msgpack.decode(frame) == {"type": "ControlAdapter", "adapter_id": "sea-r8", "action": "pin",
                                             "control_id": 7}
    assert wire.core_codec().decode(frame) == wire.ControlAdapter("sea-r8", AdapterAction.PIN, 7)


def test_an_unknown_adapter_action_is_refused_on_the_socket() -> None:
    frame = msgspec.msgpack.encode({"type": "ControlAdapter", "adapter_id": "sea-r8", "action": "explode"})
    with pytest.raises(wire.MalformedMessage, match=r"Invalid enum value 'explode'"):
        wire.core_codec().decode(frame)


def test_a_requests_cache_salt_crosses_to_the_core_and_one_out_of_bounds_is_refused() -> None:
    params = SamplingParams(max_tokens=3, cache_salt="alice-secret")
    frame = wire.api_codec().encode(wire.AddRequest("r1", [1, 2, 3], params, "sea-r8", False, 0))
    assert wire.core_codec().decode(frame).params.cache_salt == "alice-secret"
    bad = msgspec.msgpack.decode(frame)
    bad["params"]["cache_salt"] = "x" * (MAX_CACHE_SALT_LENGTH + 1)
    with pytest.raises(wire.MalformedMessage, match="cache_salt"):
        wire.core_codec().decode(msgspec.msgpack.encode(bad))
