"""PEFT LoRA folders to host-memory tensors, validated against the base model, with their LoRA scaling.

Only `adapter_config.json` and `adapter_model.safetensors` are ever read (pickled `.bin` files are
refused). Every problem found is reported at once in one `AdapterFormatError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from node.errors import AdapterFormatError
from node.lora.adapter_config import config_problems, declared_problems, scaling
from node.lora.adapter_files import DTYPE_BYTES, FLOAT_DTYPES, AdapterFiles, GatherPlan, TensorEntry
from node.lora.weights import GROUPS, MODULES, LoRAWeights, scale_stack

__all__ = ["GROUPS", "LoRATargetSpec", "LoRAWeights", "load_lora_adapter"]

_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoRATargetSpec:
    """What a base model accepts: its layer count and each projection's (in_features, out_features)."""

    num_layers: int
    module_shapes: tuple[tuple[str, tuple[int, int]], ...]
    # checkpoint projections that hold several of ours (Phi-3's qkv_proj, gate_up_proj), with the
    # rows of each: an adapter trained on one is served as its parts, A shared and B split by rows
    fused: tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...] = ()

    @classmethod
    def of(cls, num_layers: int, shapes: dict[str, tuple[int, int]],
           fused: dict[str, tuple[tuple[str, int, int], ...]] | None = None) -> LoRATargetSpec:
        return cls(num_layers=num_layers, module_shapes=tuple(sorted(shapes.items())),
                   fused=tuple(sorted((fused or {}).items())))

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.module_shapes)

    def shape(self, module: str) -> tuple[int, int]:
        return self._shapes[module]

    def __hash__(self) -> int:  # part of the key of every load's plan: hashed once, not per load
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash((self.num_layers, self.module_shapes, self.fused))


@dataclass(frozen=True)
class _Stack:
    """One host stack, built by joining byte ranges of the file: a group's A or a module's B."""

    name: str
    parts: tuple[tuple[int, int] | int, ...]  # (begin, end) in the file, or a run of zero bytes
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    """What an adapter's config and header say: its problems, or how to build its weights."""

    problems: tuple[str, ...]
    names: dict[tuple[int, str], tuple[str, str]]  # (layer, module) -> (A key, B key)
    scales: dict[tuple[int, str], float]
    stacks: tuple[_Stack, ...] | None  # None: not one dtype and one rank (LoRAWeights.from_modules)
    gather: GatherPlan | None  # where the stacks' bytes come from in the file
    dtype: torch.dtype = torch.float32  # of the stacks in the file
    b_scale: float | None = None  # one scaling for every B stack, if there is one (and it is not 1)

    @cached_property
    def views(self) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], int, bool], ...]:
        """Each stack's name, shape, strides and first element in the gathered buffer (contiguous, one
        after the other), and whether it is an A stack (a group's): one `as_strided` view each."""
        assert self.stacks is not None
        views, offset = [], 0
        for s in self.stacks:
            strides = tuple(math.prod(s.shape[i + 1:]) for i in range(len(s.shape)))
            views.append((s.name, s.shape, strides, offset, s.name in GROUPS))
            offset += math.prod(s.shape)
        return tuple(views)

    @cached_property
    def rank(self) -> int:
        assert self.stacks is not None
        return self.stacks[0].shape[1] // len(GROUPS[self.stacks[0].name])

    @cached_property
    def ranks(self) -> dict[tuple[int, str], int]:
        """(layer, module) -> rank, shared by every load of the plan (read-only)."""
        return dict.fromkeys(self.names, self.rank)


MAX_CACHED_PLANS = 64
_PLANS: dict[tuple[object, ...], _Plan] = {}


def load_lora_adapter(source: str | Path | AdapterFiles, target: LoRATargetSpec,
                      max_rank: int, pin_memory: bool = False) -> LoRAWeights:
    """Parse and validate a PEFT LoRA folder (or its files already read and verified by the store);
    raises AdapterFormatError naming every problem.

    Everything but the tensor bytes is decided by the config, the safetensors header, the file size
    and the base model, and adapters of one shape share all of them: that plan is kept (64 at most),
    so a load is mostly joining byte ranges. The bytes are checked finite unless the files say they
    were at an earlier load of the same trusted disk cache entry (`AdapterFiles.is_vetted`).
    `pin_memory`: the host stacks in pinned memory (for CUDA slots: the bytes are read straight into
    the memory their non-blocking copy reads)."""
    files = source if isinstance(source, AdapterFiles) else AdapterFiles.read(source)
    key = (files.config_bytes, files.header_bytes, files.size, target, max_rank)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(files, target, max_rank)
        if len(_PLANS) >= MAX_CACHED_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    if plan.problems:
        raise AdapterFormatError(f"adapter {files.folder.name} is not servable: " + "; ".join(plan.problems),
                                 folder=str(files.folder), problems=list(plan.problems))
    if plan.stacks is None:
        modules = {k: (files.tensor(a), files.tensor(b)) for k, (a, b) in plan.names.items()}
        weights = LoRAWeights.from_modules(*_unfuse(modules, plan.scales, dict(target.fused)))
        _refuse_non_finite(files, _non_finite({**weights.a, **weights.b}, weights.rank))
        return weights
    assert plan.gather is not None
    raw = _float32(files.gather(plan.gather, pin_memory).view(plan.dtype), pin_memory)  # one preadv from disk
    a: dict[str, torch.Tensor] = {}  # A stacks in GROUPS order, then B stacks in MODULES order (`_stacks`)
    b: dict[str, torch.Tensor] = {}
    for name, shape, strides, offset, is_a in plan.views:
        (a if is_a else b)[name] = raw.as_strided(shape, strides, offset)
    if plan.b_scale is None:  # per-module scalings: folded into B; else B as the file has it, scaled by the slot copy
        b = {m: scale_stack(t, m, plan.scales) for m, t in b.items()}
    b_scale = plan.b_scale if plan.b_scale is not None else 1.0
    if not files.is_vetted:  # the bytes, not the plan; scaled, which can overflow a huge weight
        _refuse_non_finite(files, _non_finite({**a, **b}, plan.rank, b_scale))
    return LoRAWeights(rank=plan.rank, a=a, b=b, ranks=plan.ranks, b_scale=b_scale)


def _float32(raw: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """The gathered stacks as float32 (the file's own buffer if they are; pinned like it if asked)."""
    if raw.dtype == torch.float32:
        return raw
    return torch.empty(raw.shape, dtype=torch.float32, pin_memory=pin_memory).copy_(raw)


def _unfuse(modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scales: dict[tuple[int, str], float],
            fused: dict[str, tuple[tuple[str, int, int], ...]],
            ) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], dict[tuple[int, str], float]]:
    """A LoRA on a fused projection as LoRAs on its parts: B @ A @ x has rows [start, end) of part m
    exactly when part m's LoRA is (A, B[start:end])."""
    out_modules, out_scales = {}, {}
    for (layer, module), (a, b) in modules.items():
        parts = fused.get(module, ((module, 0, b.shape[0]),))
        for part, start, end in parts:
            out_modules[(layer, part)] = (a, b[start:end])  # A [r, in], B rows [end - start, r]
            out_scales[(layer, part)] = scales[(layer, module)]
    return out_modules, out_scales


def _non_finite(stacks: dict[str, torch.Tensor], rank: int, b_scale: float = 1.0) -> list[tuple[int, str]]:
    """(layer, module) of every NaN or Inf in the host stacks, the B stacks times `b_scale`: an A stack
    is [layers, modules * rank, in] (see GROUPS), a B stack [layers, out, rank].

    A stack whose sum is finite holds no NaN or Inf (either makes the sum NaN or Inf): one reduction
    instead of a boolean tensor as big as the stack (0.06 ms for 1 MiB of weights instead of
    0.57). A stack whose sum is not finite is searched element by element, which names the layers,
    or finds nothing if the sum only overflowed."""
    bad = set()
    for name, stack in stacks.items():
        if name not in GROUPS and b_scale != 1.0:
            stack = stack * b_scale  # as the slot will hold it
        if torch.isfinite(stack.sum()):
            continue
        rows = ~stack.isfinite().all(dim=-1)  # [layers, modules * rank] or [layers, out]
        bad |= {(layer, GROUPS[name][row // rank] if name in GROUPS else name)
                for layer, row in rows.nonzero().tolist()}
    return sorted(bad)


def _refuse_non_finite(files: AdapterFiles, bad: list[tuple[int, str]]) -> None:
    if bad:
        problems = [f"layers.{layer}.{module}: weights contain NaN or Inf" for layer, module in bad]
        raise AdapterFormatError(f"adapter {files.folder.name} is not servable: " + "; ".join(problems),
                                 folder=str(files.folder), problems=problems)


def _make_plan(files: AdapterFiles, target: LoRATargetSpec, max_rank: int) -> _Plan:
    config_problems_found = config_problems(files.config)
    problems = list(config_problems_found)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in files.header:
        m = _KEY.fullmatch(key)
        if m is None or m.group(2) not in (*MODULES, *dict(target.fused)):
            problems.append(f"unsupported tensor {key}")
            continue
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = key
    names: dict[tuple[int, str], tuple[str, str]] = {}
    scales: dict[tuple[int, str], float] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if _pair_fits(layer, module, ab, files, target, max_rank, problems):
            names[(layer, module)] = (ab["A"], ab["B"])
    if not names and not problems:
        problems.append("the adapter has no LoRA weights")
    if not config_problems_found:  # r, alpha and the patterns are valid: hold the weights to them
        ranks = {k: files.header[a].shape[0] for k, (a, _) in names.items()}
        problems += declared_problems(files.config, ranks)
        scales = {k: scaling(files.config, *k, rank) for k, rank in ranks.items()}
    is_fused = any(module in dict(target.fused) for _, module in names)  # Phi-3: split in `_unfuse`
    stacks = _stacks(files, names) if names and not problems and not is_fused else None
    if stacks is None:
        return _Plan(tuple(problems), names, scales, None, None)
    dtype = FLOAT_DTYPES[files.header[next(iter(names.values()))[0]].dtype]
    b_scale = next(iter(scales.values())) if len(set(scales.values())) == 1 else None
    return _Plan(tuple(problems), names, scales, stacks, GatherPlan.of([s.parts for s in stacks]), dtype,
                 b_scale if b_scale != 1.0 else None)


def _stacks(files: AdapterFiles, names: dict[tuple[int, str], tuple[str, str]]) -> tuple[_Stack, ...] | None:
    """How to join the file's byte ranges into the host stacks, in the common case of one dtype and
    one rank throughout; None otherwise."""
    header = files.header
    entries = [header[key] for ab in names.values() for key in ab]
    rank = entries[0].shape[0]
    if len({e.dtype for e in entries}) != 1 or any(header[a].shape[0] != rank for a, _ in names.values()):
        return None
    elem = DTYPE_BYTES[entries[0].dtype]
    num_layers = max(layer for layer, _ in names) + 1
    a_stacks, b_stacks = [], []  # the A stacks first: the B stacks are then one run of the buffer
    for group, modules in GROUPS.items():
        present = [m for m in modules if any(k[1] == m for k in names)]
        if not present:
            continue
        d_in = header[next(a for (_, m), (a, _) in names.items() if m in present)].shape[1]
        parts = tuple(_range(header[names[(layer, m)][0]]) if (layer, m) in names else rank * d_in * elem
                      for layer in range(num_layers) for m in modules)
        # [num_layers * len(group) * rank * in] -> [num_layers, len(group) * rank, in]
        a_stacks.append(_Stack(group, parts, (num_layers, len(modules) * rank, d_in)))
        for m in present:
            d_out = header[next(b for (_, n), (_, b) in names.items() if n == m)].shape[0]
            parts = tuple(_range(header[names[(layer, m)][1]]) if (layer, m) in names else d_out * rank * elem
                          for layer in range(num_layers))
            b_stacks.append(_Stack(m, parts, (num_layers, d_out, rank)))  # [num_layers, out, rank]
    return (*a_stacks, *b_stacks)


def _range(entry: TensorEntry) -> tuple[int, int]:
    return entry.begin, entry.end


def _pair_fits(layer: int, module: str, names: dict[str, str], files: AdapterFiles,
               target: LoRATargetSpec, max_rank: int, problems: list[str]) -> bool:
    name = f"layers.{layer}.{module}"
    if layer >= target.num_layers:
        problems.append(f"{name}: the base model has {target.num_layers} layers")
        return False
    if "A" not in names or "B" not in names:
        problems.append(f"{name}: lora_{'A' if 'A' not in names else 'B'} is missing")
        return False
    a, b = files.header[names["A"]], files.header[names["B"]]
    d_in, d_out = target.shape(module)
    rank = a.shape[0] if a.shape else 0
    if len(a.shape) != 2 or a.shape[1] != d_in or b.shape != (d_out, rank) or rank == 0:
        problems.append(f"{name}: lora_A {a.shape} / lora_B {b.shape} do not fit in={d_in} out={d_out}")
        return False
    if rank > max_rank:
        problems.append(f"{name}: rank {rank} exceeds max_lora_rank {max_rank}")
        return False
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        problems.append(f"{name}: weights must be floating point")
        return False
    return True
