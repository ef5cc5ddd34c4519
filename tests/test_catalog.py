"""`AdapterCatalog.statuses` (`GET /v1/adapters`, `loranode status`): every adapter registered for the
node's base model with what a request for it meets now, from the mirror and the adapter provider."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from node.catalog import AdapterCatalog
from node.db.models import Adapter, IndexerCursor
from node.db.session import make_engine, session_factory, upgrade
from node.errors import AdapterIntegrityError
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterSource

BASE = "0x" + "11" * 32
OTHER_BASE = "0x" + "22" * 32


def _adapter(adapter_id: int, block: int, base: str = BASE, deprecated_block: int | None = None) -> Adapter:
    return Adapter(adapter_id=adapter_id, owner="0x" + "33" * 20, base_model=base, weights_sha256="0x" + "44" * 32,
                   uri=f"file:///adapters/{adapter_id}", owner_share_bps=2_000, lineage_hash="0x" + "55" * 32,
                   deprecated_block=deprecated_block, tx_hash="0x" + "66" * 32, block_number=block,
                   updated_block=deprecated_block or block, is_final=block <= 10)


def _refuse(path: Path) -> str:
    if path.name == "4":
        raise AdapterIntegrityError("adapter 4 at file:///adapters/4 hashes to 0xab, registered 0x44: refused")
    return path.name


def test_each_adapter_shows_what_a_request_for_it_meets(db_url: str) -> None:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url, pooled=False))
    with factory() as session, session.begin():
        session.add(IndexerCursor(chain_id=31337, last_block=12, final_block=10, contracts="{}",
                                  updated_at=datetime.now(UTC)))
        session.add_all([_adapter(1, 5), _adapter(2, 12), _adapter(3, 4, deprecated_block=6), _adapter(4, 5),
                         _adapter(5, 5, base=OTHER_BASE), _adapter(6, 3)])
    provider: InMemoryAdapterProvider[str] = InMemoryAdapterProvider(_refuse)
    for name in ("1", "4"):
        provider.register(name, AdapterSource(uri=f"file:///adapters/{name}", sha256="0x" + "44" * 32))
    provider.get("1")
    with pytest.raises(AdapterIntegrityError):
        provider.get("4")
    statuses = {s.adapter_id: (s.state, s.detail) for s in AdapterCatalog(factory, provider, BASE).statuses()}
    assert set(statuses) == {1, 2, 3, 4, 6}  # adapter 5 is for another base model
    assert statuses[1] == ("serving", "in host memory")
    assert statuses[2] == ("not_final", "served once block 12 is final (final block now 10)")
    assert statuses[3] == ("deprecated", "deprecated by its owner")
    assert statuses[4][0] == "cannot_load" and "hashes to 0xab" in statuses[4][1]
    assert statuses[6][0] == "serving" and statuses[6][1].startswith("not fetched yet")
