"""The indexer's event signatures are the compiled contracts' events, indexed flags included."""

from __future__ import annotations

from node.chain.artifacts import load_artifacts
from node.chain.events import SPECS, Role

CONTRACT_OF = {Role.DATASET_REGISTRY: "DatasetRegistry", Role.ADAPTER_REGISTRY: "AdapterRegistry",
               Role.ESCROW: "PaymentEscrow", Role.SETTLEMENT: "Settlement", Role.X402_CHANNELS: "X402Channels"}


def test_event_specs_match_the_compiled_abis() -> None:
    arts = load_artifacts()
    for spec in SPECS:
        name = spec.event or spec.name
        abi = [e for e in arts[CONTRACT_OF[spec.role]].abi if e["type"] == "event" and e["name"] == name]
        assert len(abi) == 1, spec.name
        got = [(i["name"], _type(i), i["indexed"]) for i in abi[0]["inputs"]]
        assert got == [(p.name, p.type, p.indexed) for p in spec.params], spec.name


def _type(param: dict) -> str:
    """A parameter's canonical type; a struct as its tuple of component types."""
    if param["type"] == "tuple":
        return "(" + ",".join(_type(c) for c in param["components"]) + ")"
    return str(param["type"])


def test_the_channel_contracts_events_that_repeat_ours_keep_their_own_topics() -> None:
    by_name = {s.name: s for s in SPECS}
    assert by_name["ChannelDeposited"].canonical == "Deposited(bytes32,address,uint128,uint128)"
    assert by_name["ChannelDeposited"].topic0 != by_name["Deposited"].topic0
    assert len({s.topic0 for s in SPECS}) == len(SPECS)
