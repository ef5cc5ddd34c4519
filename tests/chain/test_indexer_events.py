"""The indexer's event signatures are the compiled contracts' events, indexed flags included."""

from __future__ import annotations

from node.chain.artifacts import load_artifacts
from node.chain.events import SPECS, Role

CONTRACT_OF = {Role.DATASET_REGISTRY: "DatasetRegistry", Role.ADAPTER_REGISTRY: "AdapterRegistry",
               Role.ESCROW: "PaymentEscrow", Role.SETTLEMENT: "Settlement"}


def test_event_specs_match_the_compiled_abis() -> None:
    arts = load_artifacts()
    for spec in SPECS:
        abi = [e for e in arts[CONTRACT_OF[spec.role]].abi if e["type"] == "event" and e["name"] == spec.name]
        assert len(abi) == 1, spec.name
        got = [(i["name"], i["type"], i["indexed"]) for i in abi[0]["inputs"]]
        assert got == [(p.name, p.type, p.indexed) for p in spec.params], spec.name
