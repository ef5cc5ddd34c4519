"""Evidence on small datasets with known overlaps, through the real tokenizer and on-disk indexes:
an answer copied from one dataset gives it the evidence, an answer in none gives the lineage weights,
and a dataset outside the lineage never gets anything."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from node.attribution.attributor import Attributor
from node.attribution.evidence import attribute
from node.attribution.index_store import DatasetRef, IndexStore
from node.attribution.rule import CURRENT_RULE
from node.devkit.corpus import TEXT
from node.errors import BadRequest
from node.lora.content_hash import dataset_content_hash
from node.protocol.hexstr import to_hex

LINES = TEXT.splitlines()
SHIPS = "\n".join(LINES[0:8])  # dataset 1
TOWNS = "\n".join(LINES[8:16])  # dataset 2
STARS = "\n".join(LINES[16:24])  # dataset 3: indexed, but outside the lineage used below
NONSENSE = "Quartz zebras juggle vivid kumquats beside xylophones while jovial wizards box."


@pytest.fixture(scope="module")
def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[IndexStore, list[DatasetRef]]:
    root = tmp_path_factory.mktemp("evidence")
    refs = []
    for i, text in enumerate((SHIPS, TOWNS, STARS), start=1):
        path = root / f"d{i}.txt"
        path.write_text(text)
        refs.append(DatasetRef(i, to_hex(dataset_content_hash(path)), path.as_uri()))
    return IndexStore(root / "indexes", AutoTokenizer.from_pretrained(str(tiny_model))), refs


def _attribute(store: IndexStore, refs: list[DatasetRef], text: str, lineage: list[int]):
    indexes = {r.dataset_id: store.get(r) for r in refs}
    return attribute(text, [r.dataset_id for r in refs], lineage, indexes, store.tokenizer, store.tokenizer_id,
                     CURRENT_RULE)


def test_an_answer_copied_from_one_dataset_gives_it_the_evidence(world: tuple[IndexStore, list[DatasetRef]]) -> None:
    store, refs = world
    copied = LINES[3]  # a whole sentence of dataset 1
    result = _attribute(store, refs[:2], f"Well, {copied} Indeed.", [5_000, 5_000])
    ships, towns = result.evidence
    assert ships.score >= 10 and towns.score == 0
    assert len(ships.spans) == 1 and ships.spans[0].count == 1
    assert copied[5:-5] in ships.spans[0].text  # the span is the copied sentence (token edges aside)
    assert result.weights_bps[0] == 7_500 and result.weights_bps[1] == 2_500  # half the weight follows evidence
    assert result.lineage_hash != _attribute(store, refs[:2], NONSENSE, [5_000, 5_000]).lineage_hash


def test_an_answer_in_no_dataset_gets_exactly_the_lineage_weights(world: tuple[IndexStore, list[DatasetRef]]) -> None:
    store, refs = world
    result = _attribute(store, refs, NONSENSE, [6_000, 3_000, 1_000])
    assert [e.score for e in result.evidence] == [0, 0, 0]
    assert result.weights_bps == (6_000, 3_000, 1_000)


def test_a_dataset_outside_the_lineage_never_gets_anything(world: tuple[IndexStore, list[DatasetRef]]) -> None:
    store, refs = world
    result = _attribute(store, refs[:2], LINES[20], [6_000, 4_000])  # a sentence of dataset 3 only
    assert result.dataset_ids == (1, 2) and result.weights_bps == (6_000, 4_000)


def test_an_answer_mixing_two_datasets_splits_the_evidence(world: tuple[IndexStore, list[DatasetRef]]) -> None:
    store, refs = world
    result = _attribute(store, refs, f"{LINES[1]} {LINES[9]}", [4_000, 4_000, 2_000])
    ships, towns, stars = result.evidence
    assert ships.score > 0 and towns.score > 0 and stars.score == 0
    assert result.weights_bps[2] == 1_000  # no evidence: only its halved lineage weight
    assert sum(result.weights_bps) == 10_000
    doc = result.to_json()
    assert doc["rule"] == 1 and doc["weightsBps"] == list(result.weights_bps)
    assert doc["evidence"][0]["spans"][0]["end"] - doc["evidence"][0]["spans"][0]["start"] == ships.score


def test_indexes_are_named_by_content_hash_and_loaded_from_disk(world: tuple[IndexStore, list[DatasetRef]]) -> None:
    store, refs = world
    store.get(refs[0])
    folder = store.folder(refs[0])
    assert folder.name.startswith(refs[0].content_hash[2:]) and (folder / "suffixes.npy").exists()
    built_at = (folder / "meta.json").stat().st_mtime
    again = IndexStore(store.root, store.tokenizer).get(refs[0])  # a new process: mmap, no rebuild
    assert (folder / "meta.json").stat().st_mtime == built_at
    assert again.num_tokens == store.get(refs[0]).num_tokens
    assert not any(p.name.startswith(".") for p in store.root.iterdir())  # no temporary folder left


def test_a_dataset_that_does_not_match_its_registered_hash_is_refused(
        world: tuple[IndexStore, list[DatasetRef]], tmp_path: Path) -> None:
    store, refs = world
    forged = DatasetRef(9, refs[1].content_hash, refs[0].uri)  # dataset 1's file under dataset 2's hash
    with pytest.raises(BadRequest, match="does not match its registered hash"):
        IndexStore(tmp_path, store.tokenizer).get(forged)
    assert not IndexStore(tmp_path, store.tokenizer).is_built(forged)


def test_the_attributor_answers_none_until_the_indexes_are_built(
        world: tuple[IndexStore, list[DatasetRef]], tmp_path: Path) -> None:
    store, refs = world
    attributor = Attributor(IndexStore(tmp_path, store.tokenizer))
    try:
        assert attributor.attribute(refs[:2], [5_000, 5_000], LINES[3]) is None  # schedules the builds
        assert attributor.wait(refs[:2], timeout_s=60)
        result = attributor.attribute(refs[:2], [5_000, 5_000], LINES[3])
        assert result is not None and result.weights_bps == (7_500, 2_500)
        broken = DatasetRef(5, "0x" + "00" * 32, (tmp_path / "missing.txt").as_uri())
        started = time.monotonic()
        assert attributor.attribute([broken], [10_000], LINES[3]) is None
        assert not attributor.wait([broken], timeout_s=10) and time.monotonic() - started < 10
    finally:
        attributor.close()
