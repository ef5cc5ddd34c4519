"""The LoRA training loop: packed sequences, mini-batches with gradient accumulation, checkpoints.

One optimizer step takes `grad_accum` micro-batches of `batch_size` sequences; the loss is the mean
over every predicted token of the step (micro-batches are weighted by their target count, so
padding and a short last sequence do not skew it). The data a step reads is a function of the step
alone (see `PackedSequences.order`), so a run resumed from a checkpoint reads what the uninterrupted
run would have, and on the CPU ends with the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from node.errors import BadRequest
from node.training import CHECKPOINT_DIR, MAX_DEFAULT_SEQ_LEN
from node.training.checkpoint import DataPosition, TrainerState, load_checkpoint, remove_checkpoint, save_checkpoint
from node.training.host_allocator import keep_freed_memory
from node.training.lora_linear import route_lora_linears
from node.training.packing import MicroBatch, PackedSequences
from node.training.rms_norm import route_rms_norms
from node.training.token_file import TokenFile

log = logging.getLogger(__name__)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingConfig:
    rank: int = 8
    alpha: int = 16
    lr: float = 5e-3
    target_modules: tuple[str, ...] = ALL_TARGETS
    seq_len: int | None = None  # None: the model's max_position_embeddings, capped at MAX_DEFAULT_SEQ_LEN
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # None: `epochs` passes over the data
    epochs: int = 1
    checkpoint_every: int = 100  # optimizer steps between checkpoints; 0: none
    seed: int = 0


@dataclass(frozen=True)
class TrainingPlan:
    num_tokens: int  # in the dataset
    num_sequences: int
    seq_len: int
    steps_per_epoch: int
    total_steps: int
    start_step: int  # > 0 when resumed

    @property
    def last_len(self) -> int:
        """The last sequence's tokens: what is left after the full ones (node/training/packing.py)."""
        return self.num_tokens - (self.num_sequences - 1) * self.seq_len

    def packing(self) -> str:
        """The sequences as trained: "1 sequence of 34 tokens (--seq-len 2048)", "3 sequences of 100 tokens",
        "3 sequences of 100 tokens (the last 50)"; a batch is padded only to its longest sequence."""
        if self.num_sequences == 1:
            return f"1 sequence of {self.num_tokens:,} tokens (--seq-len {self.seq_len})"
        last = "" if self.last_len == self.seq_len else f" (the last {self.last_len:,})"
        return f"{self.num_sequences:,} sequences of {self.seq_len:,} tokens{last}"


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done, counting those before a resume
    total_steps: int
    epoch: int
    loss: float  # mean over the step's predicted tokens
    num_tokens: int  # trained on in this run so far
    elapsed_s: float  # in this run so far

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


class TrainingObserver(Protocol):
    def on_start(self, plan: TrainingPlan) -> None: ...
    def on_step(self, report: StepReport) -> None: ...


class StopRequest(Protocol):
    """Set (e.g. by a Ctrl-C handler) to stop after the step in progress; `threading.Event` is one."""

    def is_set(self) -> bool: ...


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on request after `step`, with its checkpoint written to `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped after step {step}; checkpoint in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class TrainingResult:
    path: Path
    plan: TrainingPlan
    losses: tuple[float, ...]  # per step of this run, first to last
    num_tokens: int  # trained on in this run
    elapsed_s: float


@dataclass(frozen=True)
class _Run:
    """What one call of `train` works on."""

    model: PeftModel
    optimizer: torch.optim.Optimizer
    packed: PackedSequences
    plan: TrainingPlan
    out: Path
    fingerprint: dict[str, Any]


class LoRATrainer:
    """Trains a LoRA of `config` on a base model folder and writes it as a PEFT folder."""

    def __init__(self, base_folder: Path, config: TrainingConfig, device: str | None = None) -> None:
        if config.batch_size < 1 or config.grad_accum < 1 or config.epochs < 1:
            raise BadRequest("batch size, gradient accumulation and epochs are at least 1", **asdict(config))
        self.base_folder = Path(base_folder)
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its sequence order), drawn once per epoch

    def train(self, tokens: TokenFile, out: Path, *, resume: bool = False, observer: TrainingObserver | None = None,
              stop: StopRequest | None = None) -> TrainingResult:
        """Train on `tokens`, checkpointing under `out`, and save the adapter to `out` (a PEFT folder).

        Once `stop` is set, the step in progress ends, a checkpoint of it is written and
        TrainingInterrupted is raised: `resume=True` then goes on exactly where it stopped.
        """
        torch.manual_seed(self.config.seed)
        self._order = None
        if self.device.type == "cpu":
            keep_freed_memory()  # each step reuses the last one's activation memory (host_allocator.py)
        model = self._model()
        packed = PackedSequences(tokens.tokens(), self._seq_len(model), pad_id=_pad_id(model))
        if len(packed) == 0:
            raise BadRequest("the datasets hold no text to train on", token_file=str(tokens.path))
        optimizer = self._optimizer(model)
        fingerprint = self._fingerprint(tokens, packed.seq_len)
        state = load_checkpoint(model, out, fingerprint) if resume else None
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            log.info("resuming from step %d (epoch %d, offset %d)", state.step, state.position.epoch,
                     state.position.offset)
        plan = self._plan(packed, tokens.num_tokens, state.step if state else 0)
        if state is not None and state.position != self._position(plan.start_step, packed):
            raise BadRequest("the checkpoint's data position does not match its step", step=state.step)
        run = _Run(model, optimizer, packed, plan, out, fingerprint)
        losses, num_tokens, elapsed = self._loop(run, observer, stop)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        remove_checkpoint(out)
        return TrainingResult(out, plan, tuple(losses), num_tokens, elapsed)

    def _loop(self, run: _Run, observer: TrainingObserver | None,
              stop: StopRequest | None) -> tuple[list[float], int, float]:
        plan = run.plan
        if observer is not None:
            observer.on_start(plan)
        run.model.train()
        losses: list[float] = []
        num_tokens, started = 0, time.perf_counter()
        for step in range(plan.start_step, plan.total_steps):
            batches = self._step_batches(run.packed, step)
            losses.append(self._step(run.model, run.optimizer, batches))
            num_tokens += sum(b.num_tokens for b in batches)
            done = step + 1
            every = self.config.checkpoint_every
            is_stopping = stop is not None and stop.is_set() and done < plan.total_steps
            if is_stopping or (every and done % every == 0 and done < plan.total_steps):
                self._checkpoint(run, done)
            if observer is not None:
                observer.on_step(StepReport(done, plan.total_steps, step // plan.steps_per_epoch, losses[-1],
                                            num_tokens, time.perf_counter() - started))
            if is_stopping:
                raise TrainingInterrupted(done, run.out / CHECKPOINT_DIR)
        return losses, num_tokens, time.perf_counter() - started

    def _checkpoint(self, run: _Run, done: int) -> None:
        state = TrainerState(done, self._position(done, run.packed), run.fingerprint, run.optimizer.state_dict())
        save_checkpoint(run.model, state, run.out)

    def _step(self, model: PeftModel, optimizer: torch.optim.Optimizer, batches: Sequence[MicroBatch]) -> float:
        """One optimizer step over `batches`; the mean loss over all of their predicted tokens."""
        num_targets = sum(b.num_targets for b in batches)
        total = torch.zeros((), device=self.device)
        for b in batches:
            if b.num_targets == 0:
                continue  # only one-token sequences: nothing to predict
            loss = model(input_ids=b.input_ids.to(self.device),
                         labels=b.labels.to(self.device)).loss * (b.num_targets / num_targets)
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)  # one device sync per step

    def _step_batches(self, packed: PackedSequences, step: int) -> list[MicroBatch]:
        """The micro-batches of optimizer step `step` (0-based): its slice of its epoch's order."""
        position = self._position(step, packed)
        if self._order is None or self._order[0] != position.epoch:
            self._order = (position.epoch, packed.order(self.config.seed, position.epoch))
        per_step = self.config.batch_size * self.config.grad_accum
        indices = self._order[1][position.offset:position.offset + per_step]
        size = self.config.batch_size
        return [packed.batch(indices[i:i + size]) for i in range(0, len(indices), size)]

    def _position(self, step: int, packed: PackedSequences) -> DataPosition:
        per_step = self.config.batch_size * self.config.grad_accum
        steps_per_epoch = -(-len(packed) // per_step)
        return DataPosition(step // steps_per_epoch, step % steps_per_epoch * per_step)

    def _plan(self, packed: PackedSequences, num_tokens: int, start_step: int) -> TrainingPlan:
        steps_per_epoch = -(-len(packed) // (self.config.batch_size * self.config.grad_accum))
        total = self.config.max_steps or self.config.epochs * steps_per_epoch
        return TrainingPlan(num_tokens, len(packed), packed.seq_len, steps_per_epoch, total, min(start_step, total))

    def _model(self) -> PeftModel:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: the trainer reports its own progress
        base = AutoModelForCausalLM.from_pretrained(self.base_folder, dtype=torch.float32)
        base.config.use_cache = False
        config = LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha,
                            target_modules=list(self.config.target_modules), lora_dropout=0.0, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates: nothing a user can act on
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(base, config).to(self.device)
        route_lora_linears(model)  # the same math in fewer passes over the activations (lora_linear.py,
        route_rms_norms(model)  # rms_norm.py)
        return model

    def _optimizer(self, model: PeftModel) -> torch.optim.AdamW:
        """AdamW over the LoRA weights, as one fused kernel where torch has one (the same update as the
        default per-tensor loop, without its ~10 small ops per weight: 0.3 ms a step instead of 1.4 on
        bench/train.py's 56 LoRA tensors)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, fused=self.device.type in ("cpu", "cuda"))

    def _seq_len(self, model: PeftModel) -> int:
        limit = int(getattr(model.config, "max_position_embeddings", MAX_DEFAULT_SEQ_LEN))
        seq_len = self.config.seq_len or min(limit, MAX_DEFAULT_SEQ_LEN)
        if not 2 <= seq_len <= limit:
            raise BadRequest(f"the sequence length must be between 2 and the model's {limit}", seq_len=seq_len)
        return seq_len

    def _fingerprint(self, tokens: TokenFile, seq_len: int) -> dict[str, Any]:
        model_config = hashlib.sha256((self.base_folder / "config.json").read_bytes()).hexdigest()
        run_length = ("max_steps", "epochs", "checkpoint_every")  # a resumed run may go on longer
        settings = {k: v for k, v in asdict(self.config).items() if k not in run_length}
        return {**settings, "target_modules": list(self.config.target_modules), "seq_len": seq_len,
                "tokens": tokens.key, "base_config": model_config}


def _pad_id(model: PeftModel) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
