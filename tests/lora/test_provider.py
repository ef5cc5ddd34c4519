"""The one rule of an adapter's load state, shared by every provider."""

from __future__ import annotations

from collections.abc import Container

from node.lora.provider import LoadState


def _state(registered: Container[str], ready: Container[str] = (), loading: Container[str] = (),
           failed: Container[str] = ()) -> LoadState:
    return LoadState.of("a", registered=registered, ready=ready, loading=loading, failed=failed)


def test_an_adapter_never_registered_is_unknown_whatever_else_is_recorded() -> None:
    assert _state(set(), ready={"a"}, loading={"a"}, failed={"a"}) is LoadState.UNKNOWN


def test_in_host_memory_is_ready_before_a_reload_or_an_old_failure() -> None:
    assert _state({"a"}, ready={"a"}, loading={"a"}, failed={"a"}) is LoadState.READY


def test_a_load_in_flight_hides_the_last_failure_until_it_ends() -> None:
    assert _state({"a"}, loading={"a"}, failed={"a"}) is LoadState.LOADING
    assert _state({"a"}, failed={"a"}) is LoadState.FAILED


def test_registered_and_never_loaded_is_cold() -> None:
    assert _state({"a"}, ready={"b"}, loading={"b"}, failed={"b"}) is LoadState.COLD
