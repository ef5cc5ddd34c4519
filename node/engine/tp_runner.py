"""The model runner of a tensor-parallel engine: rank 0, in the engine's process.

It is `ModelRunner` with the model, the adapter slots and the KV cache split across the group
(`node.models.parallel`, `node.lora.sharding`): it schedules, keeps adapter residency for every
rank, and before each forward broadcasts the step's inputs (`node.engine.tp_step`) and scatters the
parts of adapters it copied into slots since the last step. The logits of the sampled rows are
gathered here, sampled here, and the sampled ids broadcast back. A rank that dies or a collective
that breaks ends the step with `TensorParallelError`; the group is then broken for good.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from node.engine.config import EngineConfig
from node.engine.cuda_graph import DecodeGraphs
from node.engine.model_inputs import ModelInputs
from node.engine.model_runner import ModelRunner
from node.engine.sampler import SamplerOutput
from node.engine.tp_group import TensorParallelGroup
from node.engine.tp_step import GroupInputs, StepInputs, WorkerSetup, run_step
from node.lora.adapter import LoRATargetSpec
from node.lora.sharding import LoRAShard, ShardedLoRASlotPools
from node.lora.slots import LoRASlotPools, LoRASlots
from node.models.config import ModelConfig
from node.models.parallel import ShardPlan, VocabParallel
from node.models.shard_loader import load_shard

log = logging.getLogger(__name__)


def lora_shard(plan: ShardPlan) -> LoRAShard:
    """The part of every adapter that matches the rank's part of the base model."""
    q, kv, inter = plan.q_rows(), plan.kv_rows(), plan.intermediate_rows()
    return LoRAShard(out_rows=(("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("gate_proj", inter),
                               ("up_proj", inter)),
                     in_cols=(("o", q), ("down", inter)))


def worker_threads(size: int) -> int:
    """torch threads per worker on the CPU: the cores shared among the ranks."""
    return max(1, (os.cpu_count() or 1) // size)


class TPModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: frozenset[int] = frozenset()):
        size = config.tensor_parallel_size
        self.plan = ShardPlan.of(model_config, 0, size)  # refuses a model that does not split, before spawning
        self.shards = tuple(lora_shard(ShardPlan.of(model_config, rank, size)) for rank in range(size))
        self.group = TensorParallelGroup.launch(config, max_model_len, worker_threads(size))
        self._is_step_sent = False
        try:
            super().__init__(config, self.plan.local_config(), max_model_len, eos_token_ids)
            pools = tuple((pool.max_rank, pool.num_slots) for pool in self.slots.pools)
            self.group.broadcast_object(WorkerSetup(rank_pools=pools, num_blocks=self.num_blocks))
        except BaseException:
            self.group.close()
            raise

    def _load_model(self, max_model_len: int) -> VocabParallel:
        return load_shard(self.config.model_path, self.plan, self.config.torch_dtype, self.device, max_model_len,
                          self.group)

    def _slot_pools(self, target: LoRATargetSpec) -> LoRASlotPools:
        pools = [LoRASlots(target, num, rank, self.config.torch_dtype, self.device)
                 for rank, num in self._rank_pools(target)]
        return ShardedLoRASlotPools(pools, self.shards)

    def _decode_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        return None  # not captured across ranks yet: decode steps run eagerly

    @torch.inference_mode()
    def run(self, inputs: ModelInputs) -> torch.Tensor:
        self.group.check_alive()
        self._is_step_sent = False
        with self._collectives():
            return super().run(inputs)

    @torch.inference_mode()
    def sample(self, inputs: ModelInputs, hidden: torch.Tensor) -> SamplerOutput:
        """Rank 0 samples the gathered logits and broadcasts the sampled ids to the workers."""
        with self._collectives():
            out = super().sample(inputs, hidden)
            if out.token_ids:
                self.group.broadcast_tokens(out.token_ids)
        return out

    @contextlib.contextmanager
    def _collectives(self) -> Iterator[None]:
        """A collective that fails (a rank died or hangs), or an error once the workers wait for the rest
        of the step, breaks the group; one before any collective (an adapter that cannot load) does not."""
        try:
            yield
        except RuntimeError as e:
            raise self.group.failure(e) from e
        except Exception as e:
            if self._is_step_sent:
                raise self.group.desynchronized(e) from e
            raise

    def _eager(self, inputs: ModelInputs) -> torch.Tensor:
        assert isinstance(self.slots, ShardedLoRASlotPools)
        groups, first = [], 0
        for items in [*inputs.prefill_groups, inputs.decodes]:
            if items:
                groups.append(GroupInputs([s.num_new_tokens for s in items],
                                          [s.seq.num_computed_tokens + s.num_new_tokens for s in items],
                                          [list(s.seq.block_table) for s in items], first))
            first += sum(s.num_new_tokens for s in items)
        step = StepInputs(inputs.token_ids, inputs.positions, inputs.kv_indices, inputs.token_slots,
                          tuple(groups), inputs.sample_rows, self.slots.num_pending)
        self.group.broadcast_object(step)
        self._is_step_sent = True
        if step.num_adapter_writes:
            self.group.scatter_objects(self.slots.take_writes())
        return run_step(self.model, self.kv_caches, self.slots, step, self.group, self.device)

    def close(self) -> None:
        self.group.close()
