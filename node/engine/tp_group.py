"""A tensor-parallel group on torch.distributed (gloo on the CPU, NCCL on CUDA, one device per rank).

Rank 0 is the engine's own process (it schedules); ranks 1..size-1 are worker processes it spawns
(`node.engine.tp_worker`), which die with it. The group rendezvous on a TCPStore that rank 0 binds to
a free local port. Every collective is counted (calls and payload bytes, by kind), which is what
`bench/tensor_parallel.py` reports per decode step.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import Store, TCPStore  # type: ignore[attr-defined]

from node.engine.config import EngineConfig
from node.errors import ConfigError, TensorParallelError

log = logging.getLogger(__name__)
TIMEOUT_S = 120  # a collective that waits longer than this on a rank that hangs fails the step


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to join the group and load its part of the model."""

    config: EngineConfig
    max_model_len: int
    rank: int
    size: int
    port: int
    num_threads: int | None


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """cuda:(N + rank) for a base device cuda:N; the CPU for every rank on the CPU."""
    if not config.device.startswith("cuda"):
        return torch.device("cpu")
    base = int(config.device.split(":")[1]) if ":" in config.device else 0
    return torch.device(f"cuda:{base + rank}")


class TensorParallelGroup:
    """This process's rank in the group, and the collectives the sharded step uses (counted)."""

    def __init__(self, rank: int, size: int, device: torch.device,
                 procs: Sequence[multiprocessing.process.BaseProcess] = ()):
        self.rank, self.size, self.device = rank, size, device
        self.procs = list(procs)  # rank 0: the workers, procs[i] is rank i + 1
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.broken: TensorParallelError | None = None
        self.is_counting_object_bytes = False  # pickles each step's inputs twice (the bench turns it on)

    @classmethod
    def launch(cls, config: EngineConfig, max_model_len: int, worker_threads: int | None) -> TensorParallelGroup:
        """Rank 0: spawn the workers and join them; returns once every rank is in the group."""
        if dist.is_initialized():
            raise ConfigError("one tensor-parallel engine per process: this one already has a group")
        size = config.tensor_parallel_size
        device = rank_device(config, 0)
        if device.type == "cuda" and torch.cuda.device_count() < device.index + size:
            raise ConfigError(f"tensor_parallel_size {size} needs {size} CUDA devices from {device}",
                              num_devices=torch.cuda.device_count())
        store = TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=TIMEOUT_S))
        context = mp.get_context("spawn")
        from node.engine.tp_worker import worker_main  # the worker's entry point imports this module

        procs = [context.Process(target=worker_main, args=(WorkerSpec(config, max_model_len, rank, size, store.port,
                                                                      worker_threads),),
                                 name=f"tp-rank-{rank}", daemon=True) for rank in range(1, size)]
        for proc in procs:
            proc.start()
        group = cls(0, size, device, procs)
        group._join(store)
        log.info("tensor-parallel group of %d ranks up (%s, workers %s)", size, dist.get_backend(),
                 [p.pid for p in procs])
        return group

    @classmethod
    def join(cls, spec: WorkerSpec) -> TensorParallelGroup:
        """A worker: connect to rank 0's store and join the group."""
        store = TCPStore("127.0.0.1", spec.port, spec.size, is_master=False,
                         timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = cls(spec.rank, spec.size, rank_device(spec.config, spec.rank))
        group._join(store)
        return group

    def _join(self, store: Store) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S),
                                device_id=self.device if self.device.type == "cuda" else None)

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()

    # --- collectives ------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._count("all_reduce", tensor)
        dist.all_reduce(tensor)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        self._count("gather", logits)
        if self.rank != 0:
            dist.gather(logits.contiguous(), None, dst=0)
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.gather(logits.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1)

    def broadcast_tokens(self, token_ids: list[int] | int) -> list[int]:
        """Rank 0's sampled token ids to every rank (workers pass how many they expect)."""
        count = len(token_ids) if isinstance(token_ids, list) else token_ids
        values = token_ids if isinstance(token_ids, list) else [0] * count
        tensor = torch.tensor(values, dtype=torch.long, device=self.device)
        self._count("broadcast", tensor)
        dist.broadcast(tensor, src=0)
        return [int(t) for t in tensor.tolist()]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; the step's inputs)."""
        objects = [obj]
        dist.broadcast_object_list(objects, src=0, device=self.device)
        self.calls["broadcast_object"] += 1
        if self.rank == 0 and self.is_counting_object_bytes:
            self.bytes["broadcast_object"] += len(pickle.dumps(obj))  # what the broadcast carried
        return objects[0]

    def scatter_objects(self, objs: list[Any] | None) -> Any:
        """objs[rank] from rank 0 to each rank (pickled; adapter parts)."""
        out: list[Any] = [None]
        dist.scatter_object_list(out, objs, src=0)
        self.calls["scatter_object"] += 1
        return out[0]

    # --- failure and shutdown ---------------------------------------------------------------------
    def check_alive(self) -> None:
        """Rank 0: raise TensorParallelError if the group broke or a worker is gone."""
        if self.broken is not None:
            raise self.broken
        dead = [(rank + 1, p.exitcode) for rank, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            self.broken = TensorParallelError(
                f"tensor-parallel rank {dead[0][0]} exited with code {dead[0][1]}; the group cannot step",
                ranks=[r for r, _ in dead], exit_codes=[c for _, c in dead])
            raise self.broken

    def failure(self, cause: BaseException) -> TensorParallelError:
        """Rank 0, after a collective raised: the typed error naming the rank that died (if one did)."""
        for proc in self.procs:
            proc.join(timeout=5.0)  # a worker killed mid-step has exited by now (or hangs: then it is not dead)
        try:
            self.check_alive()
        except TensorParallelError as e:
            return e
        self.broken = TensorParallelError(f"a tensor-parallel collective failed: {cause}", rank=self.rank)
        return self.broken

    def desynchronized(self, cause: BaseException) -> TensorParallelError:
        """Rank 0 failed a step after its inputs went out: the workers wait for collectives that will not
        come, so the group is broken."""
        self.broken = TensorParallelError(f"rank 0 failed a step the other ranks had started: {cause!r}",
                                          rank=self.rank)
        return self.broken

    def close(self) -> None:
        """Rank 0: stop the workers (they leave the step loop on a None step) and leave the group."""
        if self.rank == 0 and self.broken is None and all(p.is_alive() for p in self.procs):
            try:
                self.broadcast_object(None)
            except RuntimeError:
                log.warning("tensor-parallel workers did not take the stop message")
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()
