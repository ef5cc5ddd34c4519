"""The model on its device: a step is `prepare` (flat inputs of the scheduled sequences), `run` (the
forward) and `sample` (the next token of each sequence that reached its last one)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from node.engine.config import EngineConfig
from node.engine.cuda_graph import DecodeBatch, DecodeGraphs
from node.engine.model_inputs import ModelInputs, model_inputs
from node.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from node.engine.scheduler import ScheduledSeq
from node.engine.sequence import Sequence
from node.errors import ConfigError
from node.lora.adapter import LoRATargetSpec
from node.lora.copy_stream import AdapterCopyStream
from node.lora.ops import uses_triton
from node.lora.slots import LoRASlotPools, LoRASlots
from node.models.attention import AttentionBatch, AttentionGroup, build_group
from node.models.config import ModelConfig
from node.models.llama import LlamaForCausalLM
from node.models.loader import load_model
from node.models.quant import check_scheme, quantize_weights

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: frozenset[int] = frozenset()):
        self.config, self.model_config = config, model_config
        self.sampler = Sampler(eos_token_ids)
        self.device = torch.device(config.device)
        check_scheme(config.weight_quantization, self.device, config.torch_dtype)  # before the load
        self.model = self._load_model(max_model_len)
        quantize_weights(self.model, config.weight_quantization, self.device)
        # adapter slots first, so that the KV cache is sized from the memory they leave
        target = LoRATargetSpec.of(model_config.num_layers, model_config.module_shapes(), model_config.fused_modules())
        self.slots = self._slot_pools(target)
        self.copies = AdapterCopyStream(self.device)  # adapter copies on a side stream (CUDA), per-adapter events
        self.num_blocks = config.num_kv_blocks or self._fit_kv_blocks(max_model_len)
        # one block more than the block manager hands out: padded graph rows write their keys there
        shape = (self.num_blocks + 1, config.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=config.torch_dtype, device=self.device),
                           torch.zeros(shape, dtype=config.torch_dtype, device=self.device))
                          for _ in range(model_config.num_layers)]
        self.graphs = self._decode_graphs(max_model_len)
        # Sees each step's logits [num_sampled, vocab] with their sequences (tests, logprobs later).
        self.logits_observer: Callable[[list[Sequence], torch.Tensor], None] | None = None
        log.info("KV cache: %d blocks of %d tokens", self.num_blocks, config.block_size)

    def _load_model(self, max_model_len: int) -> LlamaForCausalLM:
        return load_model(self.config.model_path, self.config.torch_dtype, self.device, max_model_len)

    def _slot_pools(self, target: LoRATargetSpec) -> LoRASlotPools:
        return LoRASlotPools.build(target, self._rank_pools(target), self.config.torch_dtype, self.device)

    def close(self) -> None:
        """Release what the runner started (tensor-parallel workers); nothing for one device."""

    def _rank_pools(self, target: LoRATargetSpec) -> tuple[tuple[int, int], ...]:
        """(rank, num_slots) of each pool: `adapter_rank_pools` as configured (within the byte budget),
        or one pool of `max_adapter_slots` at `max_lora_rank`, fewer if `max_adapter_memory_bytes`
        holds fewer."""
        config, budget = self.config, self.config.max_adapter_memory_bytes
        if config.adapter_rank_pools:
            nbytes = LoRASlotPools.pools_nbytes(target, config.adapter_rank_pools, config.torch_dtype)
            if budget is not None and nbytes > budget:
                raise ConfigError("adapter_rank_pools take more than max_adapter_memory_bytes", budget=budget,
                                  pools_bytes=nbytes, pools=str(config.adapter_rank_pools))
            log.info("adapter slots: %s (rank, slots), %d bytes", config.adapter_rank_pools, nbytes)
            return config.adapter_rank_pools
        per_slot = LoRASlots.slot_nbytes(target, config.max_lora_rank, config.torch_dtype)
        num = config.max_adapter_slots
        if budget is not None:
            if budget < per_slot:
                raise ConfigError("max_adapter_memory_bytes holds no adapter slot", budget=budget,
                                  slot_bytes=per_slot, max_lora_rank=config.max_lora_rank)
            num = min(num, budget // per_slot)
        log.info("adapter slots: %d of %d bytes each", num, per_slot)
        return ((config.max_lora_rank, num),)

    def _decode_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        """CUDA graphs for decode steps: on CUDA, with Triton (the graph-safe LoRA kernels), if enabled."""
        if not (self.config.cuda_graphs and uses_triton(self.device)):
            return None
        bs = self.config.block_size
        return DecodeGraphs(self.model, self.kv_caches, self.slots, max_batch=self.config.max_num_seqs,
                            max_blocks=-(-max_model_len // bs), block_size=bs, scratch_kv_index=self.num_blocks * bs)

    def _block_bytes(self) -> int:
        c = self.model_config
        elem = torch.tensor([], dtype=self.config.torch_dtype).element_size()
        return 2 * c.num_layers * self.config.block_size * c.num_kv_heads * c.head_dim * elem

    def _fit_kv_blocks(self, max_model_len: int) -> int:
        wanted = self.config.max_num_seqs * -(-max_model_len // self.config.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_memory_fraction)
        else:
            budget = self.config.max_cpu_kv_cache_bytes
        return max(1, min(wanted, budget // self._block_bytes()))

    def prepare(self, scheduled: list[ScheduledSeq], adapter_slots: list[int]) -> ModelInputs:
        """The step's flat inputs (`adapter_slots`: the device slot of each item's adapter, -1 for
        none, from `LoRAManager.prepare`)."""
        return model_inputs(scheduled, adapter_slots, self.config.block_size)

    @torch.inference_mode()
    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """The forward: final hidden states [num_tokens, hidden], a CUDA graph for a decode-only step
        that fits one."""
        self.copies.wait_for(inputs.adapter_ids)
        decodes = inputs.decodes
        if inputs.is_decode_only and self.graphs is not None and self.graphs.bucket(len(decodes)) is not None:
            context = [s.seq.num_computed_tokens + 1 for s in decodes]
            hidden = self.graphs.run(DecodeBatch(inputs.token_ids, inputs.positions, inputs.kv_indices,
                                                 [s.seq.block_table for s in decodes], context, inputs.token_slots))
        else:
            hidden = self._eager(inputs)
        self.copies.record_use(inputs.adapter_slots)  # their slots are read until here
        return hidden

    @torch.inference_mode()
    def sample(self, inputs: ModelInputs, hidden: torch.Tensor) -> SamplerOutput:
        """The next token (and logprobs) of each sampled item, in the scheduler's order."""
        if not inputs.sampled:
            return SamplerOutput([], [])
        seqs = inputs.sampled
        logits = self.model.logits(hidden[self._long(inputs.sample_rows)])  # [num_sampled, vocab]
        if self.logits_observer is not None:
            self.logits_observer(seqs, logits)
        batch = SamplingBatch([q.params for q in seqs], [q.generator for q in seqs],
                              [q.prompt_token_ids for q in seqs], [q.output_token_ids for q in seqs],
                              [q.grammar for q in seqs], [q.counts for q in seqs])
        out = self.sampler(logits, batch)
        order = inputs.scheduled_order
        return SamplerOutput([out.token_ids[i] for i in order], [out.logprobs[i] for i in order],
                             frozenset(k for k, i in enumerate(order) if i in out.dead_ends))

    def _eager(self, inputs: ModelInputs) -> torch.Tensor:
        groups, first = [], 0
        for items in [*inputs.prefill_groups, inputs.decodes]:
            group = self._group(items, first)
            if group is not None:
                groups.append(group)
            first += sum(s.num_new_tokens for s in items)
        batch = AttentionBatch(kv_indices=self._long(inputs.kv_indices), groups=tuple(groups))
        lora = self.slots.batch(inputs.token_slots)
        hidden: torch.Tensor = self.model(self._long(inputs.token_ids), self._long(inputs.positions), batch,
                                          self.kv_caches, lora)
        return hidden

    def _group(self, items: list[ScheduledSeq], first_token: int) -> AttentionGroup | None:
        if not items:
            return None
        context = [s.seq.num_computed_tokens + s.num_new_tokens for s in items]
        return build_group([s.num_new_tokens for s in items], context, [s.seq.block_table for s in items],
                           first_token, self.device)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device)

