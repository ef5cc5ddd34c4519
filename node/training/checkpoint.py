"""Training checkpoints in the output folder: the adapter so far, the optimizer, the step and the data position.

`<out>/checkpoint/` holds a PEFT folder (the adapter as of `step`) and `trainer_state.pt`. It is written
to a temporary folder and swapped in whole, so an interrupted write leaves the previous checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from node.errors import BadRequest
from node.training import CHECKPOINT_DIR

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class DataPosition:
    """Where the next step's data starts: the epoch and the offset into that epoch's sequence order."""

    epoch: int
    offset: int


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps done
    position: DataPosition
    fingerprint: dict[str, Any]  # what the run trains on and how: a checkpoint resumes only the same run
    optimizer: dict[str, Any]


def save_checkpoint(model: PeftModel, state: TrainerState, out: Path) -> Path:
    """Write the checkpoint under `out` (replacing the previous one) and return its folder."""
    final, tmp = out / CHECKPOINT_DIR, out / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({"step": state.step, "epoch": state.position.epoch, "offset": state.position.offset,
                "fingerprint": state.fingerprint, "optimizer": state.optimizer,
                "rng": torch.get_rng_state()}, tmp / STATE_FILE)
    old = out / f"{CHECKPOINT_DIR}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(model: PeftModel, out: Path, fingerprint: dict[str, Any]) -> TrainerState | None:
    """Restore the adapter weights from `out`'s checkpoint and return its state; None if there is none.

    Raises BadRequest if the checkpoint belongs to another run (other data, model or settings).
    """
    folder = out / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        return None
    raw = torch.load(folder / STATE_FILE, weights_only=True)
    changed = sorted(k for k in fingerprint.keys() | raw["fingerprint"].keys()
                     if fingerprint.get(k) != raw["fingerprint"].get(k))
    if changed:
        raise BadRequest(f"the checkpoint in {folder} is of another run (it differs in {', '.join(changed)}); "
                         "train again with the same options, or without --resume", checkpoint=str(folder),
                         changed=changed)
    set_peft_model_state_dict(model, load_file(folder / WEIGHTS_FILE))
    torch.set_rng_state(raw["rng"])
    return TrainerState(step=raw["step"], position=DataPosition(raw["epoch"], raw["offset"]),
                        fingerprint=raw["fingerprint"], optimizer=raw["optimizer"])


def remove_checkpoint(out: Path) -> None:
    """Drop the checkpoint once the finished adapter is written (it is not part of what is published)."""
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
