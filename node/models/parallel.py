"""Megatron-style tensor parallelism of the Llama-family decoder: which slice of every weight a rank holds,
and the model whose forward runs on those slices.

With `size` ranks, rank r holds
    q/k/v, gate/up (column-parallel): its rows of the output (its query heads, its KV heads, its
                   1/size of the intermediate features); no communication;
    o, down (row-parallel):           the matching columns of the input; each gives a partial sum
                   that one all-reduce of [T, hidden] completes;
    embedding, LM head (vocabulary-parallel): its 1/size of the (padded) vocabulary; the embedding
                   is completed by one all-reduce, the logits are gathered on rank 0.
KV heads split across ranks; with fewer KV heads than ranks each KV head is replicated on
size / num_kv_heads ranks (the ones whose query heads use it). The KV cache holds the rank's KV heads.

A rank's slices are exactly the weights of a smaller model (`ShardPlan.local_config`: heads,
intermediate size and vocabulary divided by `size`), so the layers are the family's own (Llama's for
Llama, Mistral, Qwen2, Qwen3 and Phi-3; Gemma's for Gemma 2 and 3): per-head norms, soft-caps and
sliding windows act on whole heads, and a rank holds whole heads. Only the embedding and the LM head
differ (`VocabParallel`); the row-parallel all-reduces run in the projection hook
(`node.engine.tp_step`), after the LoRA deltas of o and down were added to the partial sums.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from node.errors import ConfigError
from node.models.config import ModelConfig
from node.models.gemma import GemmaForCausalLM
from node.models.llama import LlamaForCausalLM

ROW_PARALLEL_GROUPS = ("o", "down")  # projection groups whose output is a partial sum to all-reduce


class Collectives(Protocol):
    """The communication a sharded forward needs (torch.distributed in `node.engine.tp_group`)."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        ...

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Every rank's [N, V_local] logits joined on rank 0 as [N, size * V_local]; None elsewhere."""
        ...


@dataclass(frozen=True)
class ShardPlan:
    """Which part of a model rank `rank` of `size` holds."""

    cfg: ModelConfig
    rank: int
    size: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, size: int) -> ShardPlan:
        """Refuses (ConfigError) a model that cannot be split `size` ways."""
        problems = []
        if cfg.o_bias:
            problems.append("o_proj has a bias (each rank would add it to its partial sum)")
        if cfg.num_heads % size:
            problems.append(f"{cfg.num_heads} attention heads do not split {size} ways")
        if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
            problems.append(f"{cfg.num_kv_heads} KV heads neither split {size} ways nor divide {size}")
        if cfg.intermediate_size % size:
            problems.append(f"intermediate size {cfg.intermediate_size} does not split {size} ways")
        if problems:
            raise ConfigError("tensor_parallel_size does not fit the model: " + "; ".join(problems),
                              tensor_parallel_size=size, model_type=cfg.model_type)
        return cls(cfg=cfg, rank=rank, size=size)

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.size)

    @property
    def is_kv_replicated(self) -> bool:
        return self.cfg.num_kv_heads < self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.cfg.vocab_size // self.size)

    def q_rows(self) -> tuple[int, int]:
        """This rank's rows of q_proj (its query heads); also its columns of o_proj."""
        size = self.num_heads * self.cfg.head_dim
        return self.rank * size, (self.rank + 1) * size

    def kv_rows(self) -> tuple[int, int]:
        """This rank's rows of k_proj and v_proj: its KV heads (the one its query heads use, if replicated)."""
        first = self.rank // (self.size // self.cfg.num_kv_heads) if self.is_kv_replicated else \
            self.rank * self.num_kv_heads
        return first * self.cfg.head_dim, (first + self.num_kv_heads) * self.cfg.head_dim

    def intermediate_rows(self) -> tuple[int, int]:
        """This rank's rows of gate_proj and up_proj; also its columns of down_proj."""
        size = self.cfg.intermediate_size // self.size
        return self.rank * size, (self.rank + 1) * size

    def vocab_rows(self) -> tuple[int, int]:
        """This rank's vocabulary ids [start, end) of the padded vocabulary (end may pass vocab_size)."""
        return self.rank * self.vocab_per_rank, (self.rank + 1) * self.vocab_per_rank

    def local_config(self) -> ModelConfig:
        """The model this rank's slices make up on their own."""
        return dataclasses.replace(self.cfg, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.cfg.intermediate_size // self.size,
                                   vocab_size=self.vocab_per_rank)


class VocabParallel(LlamaForCausalLM):
    """A family's model on one rank: its embedding and LM head hold the rank's 1/size of the (padded)
    vocabulary. The family's own scaling of the embedding and soft-cap of the logits (Gemma) apply
    after the all-reduce and after the gather, as they would on the whole."""

    plan: ShardPlan
    comm: Collectives

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden], equal on every rank: each id's row from the rank that holds it."""
        start, end = self.plan.vocab_rows()
        is_mine = (input_ids >= start) & (input_ids < end)
        local_ids = torch.where(is_mine, input_ids - start, torch.zeros_like(input_ids))
        x = F.embedding(local_ids, self.embed) * is_mine.unsqueeze(-1).to(self.embed.dtype)
        self.comm.all_reduce(x)  # one rank adds its row, the others zeros: exact
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] on rank 0 (gathered); [0, vocab] elsewhere."""
        local = F.linear(hidden, self.lm_head).float()  # [N, V_local]
        full = self.comm.gather_logits(local)
        if full is None:
            return local.new_empty((0, self.plan.cfg.vocab_size))
        logits: torch.Tensor = full[:, : self.plan.cfg.vocab_size]  # [N, vocab]: the padding ids dropped
        return logits


class ParallelLlamaForCausalLM(VocabParallel):
    """Llama, Mistral, Qwen2, Qwen3 and Phi-3 on one rank."""


class ParallelGemmaForCausalLM(GemmaForCausalLM, VocabParallel):
    """Gemma 2 and 3 on one rank: Gemma's embed_tokens and logits wrap `VocabParallel`'s."""


PARALLEL_FAMILIES: dict[str, type[VocabParallel]] = {"llama": ParallelLlamaForCausalLM,
                                                     "gemma": ParallelGemmaForCausalLM}


def parallel_model(plan: ShardPlan, dtype: torch.dtype, max_positions: int, comm: Collectives) -> VocabParallel:
    """Rank `plan.rank`'s model of the family (uninitialised weights); its projection hook must
    all-reduce the outputs of o and down (`ROW_PARALLEL_GROUPS`)."""
    model = PARALLEL_FAMILIES[plan.cfg.family](plan.local_config(), dtype, max_positions)
    model.plan, model.comm = plan, comm
    return model
