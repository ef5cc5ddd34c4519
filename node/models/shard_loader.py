"""Load one tensor-parallel rank's slices of a Hugging Face folder (every family `node.models.loader` reads).

Only this rank's rows (or columns) of each checkpoint tensor are read from disk (`SafetensorsParts`:
positioned reads of their bytes, no read-ahead), so a rank neither reads nor holds another rank's part
of the model. Phi-3's fused q/k/v and gate/up tensors give the rank several row ranges, joined.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from node.errors import ModelFormatError
from node.models.loader import _place, weight_files
from node.models.parallel import Collectives, ShardPlan, VocabParallel, parallel_model
from node.models.safetensors_parts import SafetensorsParts

log = logging.getLogger(__name__)
_Range = tuple[int, int]
_COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "i", "up_proj": "i"}
_ROW_PARALLEL = {"o_proj": "q", "down_proj": "i"}


def source_slice(plan: ShardPlan, name: str) -> tuple[int, tuple[_Range, ...]] | None:
    """(dimension, the [start, end) ranges along it) of checkpoint tensor `name` that this rank reads,
    in the order they are joined; None: all of it."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, end = plan.vocab_rows()
        return 0, ((start, min(end, plan.cfg.vocab_size)),)
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    ranges = {"q": plan.q_rows, "kv": plan.kv_rows, "i": plan.intermediate_rows}
    if module in _COLUMN_PARALLEL:
        return 0, (ranges[_COLUMN_PARALLEL[module]](),)
    if module in _ROW_PARALLEL and name.endswith(".weight"):
        return 1, (ranges[_ROW_PARALLEL[module]](),)
    fused = plan.cfg.fused_modules().get(module)  # Phi-3: q|k|v and gate|up in one tensor
    if fused:
        return 0, tuple((first + start, first + end) for part, first, _ in fused
                        for start, end in (ranges[_COLUMN_PARALLEL[part]](),))
    return None


def load_shard(folder: str | Path, plan: ShardPlan, dtype: torch.dtype, device: torch.device,
               max_positions: int, comm: Collectives) -> VocabParallel:
    """This rank's model of the family, its weights read slice by slice from the safetensors."""
    folder = Path(folder)
    local = plan.local_config()
    with torch.device(device):
        model = parallel_model(plan, dtype, max_positions, comm)
    params = dict(model.named_parameters())
    for p in params.values():
        p.data.zero_()  # the vocabulary padding rows, and o's bias on ranks other than 0, stay zero
    loaded = dict.fromkeys(params, 0)
    for path in weight_files(folder):
        with SafetensorsParts(path) as f:
            for name in f.keys():  # noqa: SIM118 - not a mapping
                target, rows = _place(local, name)
                if target is None:
                    continue
                if target not in params:
                    raise ModelFormatError(f"unexpected weight {name}", weight=name)
                tensor = f.read(name, source_slice(plan, name))
                if target.endswith("o_bias") and plan.rank != 0:
                    loaded[target] += tensor.numel()  # added once, after the all-reduce: rank 0 holds it
                    continue
                _copy(params[target].data, rows, tensor, name)
                loaded[target] += tensor.numel()
    _check_complete(params, loaded, plan, folder)
    log.info("loaded rank %d/%d of %s (%d layers) from %s", plan.rank, plan.size, plan.cfg.model_type,
             plan.cfg.num_layers, folder)
    return model.eval()


def _copy(param: torch.Tensor, rows: _Range | None, tensor: torch.Tensor, name: str) -> None:
    dest = param if rows is None else param[rows[0]:rows[1]]
    if dest.shape[0] != tensor.shape[0] and dest.shape[1:] == tensor.shape[1:] and name.endswith(
            ("embed_tokens.weight", "lm_head.weight")):
        dest = dest[: tensor.shape[0]]  # the last rank's vocabulary slice ends before the padding
    if dest.shape != tensor.shape:
        raise ModelFormatError(f"{name} slice has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}",
                               weight=name)
    dest.copy_(tensor.to(dest.dtype))


def _check_complete(params: dict[str, torch.nn.Parameter], loaded: dict[str, int], plan: ShardPlan,
                    folder: Path) -> None:
    start, end = plan.vocab_rows()
    real_vocab_rows = max(0, min(end, plan.cfg.vocab_size) - start)
    missing = []
    for name, count in loaded.items():
        expected = params[name].numel()
        if name in ("embed", "lm_head"):
            expected = real_vocab_rows * plan.cfg.hidden_size
        if count != expected:
            missing.append(name)
    if missing:
        raise ModelFormatError(f"checkpoint lacks weights for {missing}", folder=str(folder), missing=missing)

