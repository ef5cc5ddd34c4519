"""The wire's typed messages: an adapter action crosses as its plain value and anything else is refused."""

from __future__ import annotations

import msgspec
import pytest

from node.engine import wire
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
