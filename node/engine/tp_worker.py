"""A tensor-parallel worker: ranks 1..size-1, each a process of its own under the engine (core).

It loads its slices of the model, allocates its slots and KV cache as rank 0 sized them, then runs
every step rank 0 broadcasts until rank 0 sends None (shutdown) or goes away (its collectives fail,
and the worker exits).
"""

from __future__ import annotations

import logging
import os

import torch

from node.engine.tp_group import TensorParallelGroup, WorkerSpec
from node.engine.tp_step import StepInputs, WorkerSetup, run_step
from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.slots import LoRASlotPools
from node.models.config import ModelConfig
from node.models.parallel import ShardPlan
from node.models.quant import quantize_weights
from node.models.shard_loader import load_shard

log = logging.getLogger(__name__)


def worker_main(spec: WorkerSpec) -> None:
    """The worker process's entry point (spawned by `TensorParallelGroup.launch`)."""
    logging.basicConfig(level=os.environ.get("LORANODE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s tp-rank-{spec.rank} %(levelname)s %(name)s: %(message)s")
    if spec.num_threads and not spec.config.device.startswith("cuda"):
        torch.set_num_threads(spec.num_threads)
    group = TensorParallelGroup.join(spec)
    try:
        TPWorker(spec, group).serve()
    except RuntimeError as e:  # rank 0 is gone (or broke the group): nothing left to serve
        log.error("tensor-parallel rank %d: the group broke (%s); exiting", spec.rank, e)
        raise SystemExit(1) from e


class TPWorker:
    def __init__(self, spec: WorkerSpec, group: TensorParallelGroup):
        config, self.group, self.device = spec.config, group, group.device
        cfg = ModelConfig.from_folder(config.model_path)
        plan = ShardPlan.of(cfg, spec.rank, spec.size)
        self.model = load_shard(config.model_path, plan, config.torch_dtype, self.device, spec.max_model_len, group)
        quantize_weights(self.model, config.weight_quantization, self.device)  # as rank 0 does its slices
        setup: WorkerSetup = group.broadcast_object(None)
        local = plan.local_config()
        target = LoRATargetSpec.of(local.num_layers, local.module_shapes(), local.fused_modules())
        self.slots = LoRASlotPools.build(target, setup.rank_pools, config.torch_dtype, self.device)
        shape = (setup.num_blocks + 1, config.block_size, local.num_kv_heads, local.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=config.torch_dtype, device=self.device),
                           torch.zeros(shape, dtype=config.torch_dtype, device=self.device))
                          for _ in range(local.num_layers)]
        self.last_sampled: list[int] = []  # the sampled ids of the last step, as rank 0 broadcast them

    @torch.inference_mode()
    def serve(self) -> None:
        while True:
            step: StepInputs | None = self.group.broadcast_object(None)
            if step is None:
                log.info("tensor-parallel rank %d: stopped by rank 0", self.group.rank)
                return
            if step.num_adapter_writes:
                writes: list[tuple[int, LoRAWeights]] = self.group.scatter_objects(None)
                for slot, weights in writes:
                    self.slots.write(slot, weights)
            hidden = run_step(self.model, self.kv_caches, self.slots, step, self.group, self.device)
            if step.sample_rows:
                self.model.logits(hidden[torch.tensor(step.sample_rows, device=self.device)])
                self.last_sampled = self.group.broadcast_tokens(len(step.sample_rows))
