"""One tensor-parallel step as every rank runs it: the inputs rank 0 broadcasts, and the forward.

Rank 0 schedules, picks each token's adapter slot and broadcasts a `StepInputs` (token ids,
positions, KV indices, block tables, adapter slots, the rows to sample); every rank then runs the same
forward over its slices (`run_step`), the logits of the sampled rows are gathered on rank 0, which
samples and broadcasts the sampled token ids, so each rank ends the step knowing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.lora.slots import LoRABatch, LoRASlotPools
from node.models.attention import AttentionBatch, build_group
from node.models.llama import LlamaForCausalLM
from node.models.parallel import ROW_PARALLEL_GROUPS, Collectives


@dataclass(frozen=True)
class GroupInputs:
    """A group of sequences attended together (`node.models.attention.build_group`'s arguments)."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    first_token: int


@dataclass(frozen=True)
class StepInputs:
    token_ids: list[int]
    positions: list[int]
    kv_indices: list[int]  # KV cache index of each token (block * block_size + offset)
    token_slots: list[int]  # adapter slot of each token, -1 for the base model
    groups: tuple[GroupInputs, ...]
    sample_rows: list[int]  # flat token rows whose logits are sampled
    num_adapter_writes: int  # adapters copied into slots this step: their parts are scattered next


@dataclass(frozen=True)
class WorkerSetup:
    """Sent once, after rank 0 sized its slots and KV cache: the workers allocate the same."""

    rank_pools: tuple[tuple[int, int], ...]
    num_blocks: int


class ProjectionHook:
    """The model's projection hook on a tensor-parallel rank: adds the step's LoRA deltas to the
    rank's slice of each projection's output, then completes the row-parallel ones (o, down) with
    their all-reduce: the LoRA deltas ride in it, with no collective of their own."""

    def __init__(self, lora: LoRABatch | None, comm: Collectives):
        self.lora, self.comm = lora, comm

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.lora is not None:
            self.lora.apply(layer, group, x, out)
        if group in ROW_PARALLEL_GROUPS:
            self.comm.all_reduce(out)


def run_step(model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slots: LoRASlotPools,
             step: StepInputs, comm: Collectives, device: torch.device) -> torch.Tensor:
    """This rank's forward of the step -> final hidden states [T, hidden] (equal on every rank)."""
    groups = tuple(build_group(g.query_lens, g.context_lens, g.block_tables, g.first_token, device)
                   for g in step.groups)
    batch = AttentionBatch(kv_indices=_long(step.kv_indices, device), groups=groups)
    hook = ProjectionHook(slots.batch(step.token_slots), comm)
    hidden: torch.Tensor = model(_long(step.token_ids, device), _long(step.positions, device), batch, kv_caches, hook)
    return hidden


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)
