"""One step's model inputs: the scheduled sequences flattened into the token rows of one forward.

Rows run prefills (in groups of similar length) then decodes, each sorted by adapter slot so that
LoRA segments become long runs. Built on the CPU, before the forward; the model runner turns them
into tensors (`ModelRunner.run`) and samples the rows that reach a sequence's last token
(`ModelRunner.sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.engine.scheduler import ScheduledSeq
from node.engine.sequence import Sequence


@dataclass(frozen=True)
class ModelInputs:
    prefill_groups: list[list[ScheduledSeq]]  # attended group by group, longest queries first
    decodes: list[ScheduledSeq]  # one new token each, attended as one group
    token_ids: list[int]
    positions: list[int]
    kv_indices: list[int]  # KV cache index of each token (block * block_size + offset)
    token_slots: list[int]  # adapter slot of each token, -1 for the base model
    adapter_ids: frozenset[str]  # the step's adapters: their copies into slots must be done first
    sample_rows: list[int]  # the flat token rows whose logits are sampled
    sampled: list[Sequence]  # the sequence of each sample row
    scheduled_order: list[int]  # index into `sampled` of each sampled item, in the scheduler's order

    @property
    def is_decode_only(self) -> bool:
        return not self.prefill_groups

    @property
    def adapter_slots(self) -> set[int]:
        return set(self.token_slots) - {-1}


def model_inputs(scheduled: list[ScheduledSeq], adapter_slots: list[int], block_size: int) -> ModelInputs:
    """The step's rows (`adapter_slots`: each item's adapter slot, -1 for none, in `scheduled` order)."""
    slot_of = {id(s.seq): slot for s, slot in zip(scheduled, adapter_slots, strict=True)}
    prefill_groups = prefill_length_groups([s for s in scheduled if s.num_new_tokens > 1])
    for group in prefill_groups:
        group.sort(key=lambda s: slot_of[id(s.seq)])
    decodes = sorted((s for s in scheduled if s.num_new_tokens == 1), key=lambda s: slot_of[id(s.seq)])
    token_ids: list[int] = []
    positions: list[int] = []
    kv_indices: list[int] = []
    token_slots: list[int] = []
    sample_rows: list[int] = []
    sampled: list[Sequence] = []
    bs = block_size
    for item in [s for group in prefill_groups for s in group] + decodes:
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        token_ids.extend(seq.tokens(start, end))
        positions.extend(range(start, end))
        kv_indices.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
        token_slots.extend([slot_of[id(seq)]] * item.num_new_tokens)
        if item.is_sampled:
            sample_rows.append(len(token_ids) - 1)
            sampled.append(seq)
    row = {id(q): i for i, q in enumerate(sampled)}
    return ModelInputs(prefill_groups, decodes, token_ids, positions, kv_indices, token_slots,
                       frozenset(s.seq.adapter_id for s in scheduled if s.seq.adapter_id is not None),
                       sample_rows, sampled, [row[id(s.seq)] for s in scheduled if s.is_sampled])


def prefill_length_groups(prefills: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
    """Prefills in groups of similar query length, longest first: attention pads a group to its longest
    query, so a 64-token prefill past a cached prefix must not be padded to a 2,000-token chunk. A group
    takes queries down to half its longest."""
    groups: list[list[ScheduledSeq]] = []
    for item in sorted(prefills, key=lambda s: -s.num_new_tokens):
        if groups and 2 * item.num_new_tokens >= groups[-1][0].num_new_tokens:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
