"""Training: the loss falls, a resumed run ends where an uninterrupted one does, and the engine serves the result."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.errors import BadRequest
from node.lora.content_hash import dataset_content_hash
from node.training import CHECKPOINT_DIR
from node.training.lora_trainer import LoRATrainer, StepReport, TrainingConfig, TrainingInterrupted, TrainingPlan
from node.training.packing import PackedSequences
from node.training.token_file import TokenFile, tokenize_datasets
from tests.engine.reference import PeftReference
from tests.training.conftest import write_dataset

CONFIG = TrainingConfig(rank=4, alpha=8, lr=1e-2, seq_len=64, batch_size=2, grad_accum=2, max_steps=6,
                        checkpoint_every=2, seed=7)


@pytest.fixture(scope="module")
def tokens(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    data = write_dataset(tmp_path_factory.mktemp("data") / "d.txt", 8_000)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenize_datasets(tokenizer, [(data, dataset_content_hash(data))], data.parent / "tok")


class Interrupt(KeyboardInterrupt):
    pass


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.plans: list[TrainingPlan] = []
        self.reports: list[StepReport] = []
        self.stop_after = stop_after

    def on_start(self, plan: TrainingPlan) -> None:
        self.plans.append(plan)

    def on_step(self, report: StepReport) -> None:
        self.reports.append(report)
        if report.step == self.stop_after:
            raise Interrupt  # Ctrl-C after this step: its checkpoint (every 2 steps) is at step 2


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_the_loss_falls_and_the_output_is_a_peft_folder(tiny_model: Path, tokens: TokenFile, tmp_path: Path) -> None:
    recorder = Recorder()
    result = LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path / "out", observer=recorder)
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    packed = PackedSequences(tokens.tokens(), 64)
    visited = packed.order(CONFIG.seed, epoch=0)[:6 * 2 * 2]  # every step: 2 micro-batches of 2 sequences
    assert result.num_tokens == sum(len(packed.sequence(i)) for i in visited)
    assert [r.step for r in recorder.reports] == [1, 2, 3, 4, 5, 6] and recorder.reports[-1].tokens_per_s > 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".md")
    assert names == ["adapter_config.json", "adapter_model.safetensors"]  # the checkpoint is gone once done


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_model: Path, tokens: TokenFile,
                                                                       tmp_path: Path) -> None:
    whole = LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path / "whole")
    with pytest.raises(Interrupt):
        LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path / "cut", observer=Recorder(stop_after=3))
    assert (tmp_path / "cut" / CHECKPOINT_DIR / "trainer_state.pt").is_file()
    recorder = Recorder()
    resumed = LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path / "cut", resume=True,
                                                                   observer=recorder)
    assert recorder.plans[0].start_step == 2 and [r.step for r in recorder.reports] == [3, 4, 5, 6]
    assert resumed.losses == whole.losses[2:]
    expected, got = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_right_padded_sequence_trains_as_it_would_alone_without_a_mask(tiny_model: Path) -> None:
    """Packing pads the short last sequence on the right and passes no attention mask (packing.py):
    its loss and its gradients are those of the sequence alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    packed = PackedSequences(torch.randint(3, 200, (90,)).numpy(), 64)  # sequences of 64 and 26 tokens
    padded = packed.batch([1, 0])
    short = torch.from_numpy(packed.sequence(1))[None]  # [1, 26]

    def loss_and_grads(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=input_ids).logits[0, :25]  # [25, vocab]: the short row's predictions
        loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:26])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    alone, padded_out = loss_and_grads(short, short), loss_and_grads(padded.input_ids, padded.labels)
    assert (padded.input_ids[0, 26:] == 0).all() and padded.num_targets == 25 + 63
    torch.testing.assert_close(padded_out[0], alone[0])
    for got, expected in zip(padded_out[1], alone[1], strict=True):
        torch.testing.assert_close(got, expected)


def test_a_stop_request_ends_the_step_checkpoints_it_and_resumes_there(tiny_model: Path, tokens: TokenFile,
                                                                       tmp_path: Path) -> None:
    config = TrainingConfig(**{**CONFIG.__dict__, "checkpoint_every": 0})  # only the stop writes one
    whole = LoRATrainer(tiny_model, config, device="cpu").train(tokens, tmp_path / "whole")
    stop = threading.Event()

    class StopAtThree(Recorder):
        def on_step(self, report: StepReport) -> None:
            if report.step == 2:
                stop.set()  # as Ctrl-C during step 3 does: step 3 still ends

    with pytest.raises(TrainingInterrupted) as interrupted:
        LoRATrainer(tiny_model, config, device="cpu").train(tokens, tmp_path / "cut", observer=StopAtThree(),
                                                            stop=stop)
    assert interrupted.value.step == 3 and interrupted.value.checkpoint == tmp_path / "cut" / CHECKPOINT_DIR
    recorder = Recorder()
    resumed = LoRATrainer(tiny_model, config, device="cpu").train(tokens, tmp_path / "cut", resume=True,
                                                                  observer=recorder)
    assert recorder.plans[0].start_step == 3 and resumed.losses == whole.losses[3:]
    expected, got = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_another_run_is_refused(tiny_model: Path, tokens: TokenFile, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path, observer=Recorder(stop_after=2))
    other = TrainingConfig(**{**CONFIG.__dict__, "batch_size": 1})
    with pytest.raises(BadRequest, match="batch_size"):
        LoRATrainer(tiny_model, other, device="cpu").train(tokens, tmp_path, resume=True)


def test_epochs_set_the_steps_when_max_steps_is_not_given(tiny_model: Path, tokens: TokenFile, tmp_path: Path) -> None:
    config = TrainingConfig(**{**CONFIG.__dict__, "max_steps": None, "epochs": 2, "seq_len": 256})
    recorder = Recorder()
    LoRATrainer(tiny_model, config, device="cpu").train(tokens, tmp_path, observer=recorder)
    plan = recorder.plans[0]
    assert plan.num_sequences == -(-tokens.num_tokens // 256)
    assert plan.steps_per_epoch == -(-plan.num_sequences // 4) and plan.total_steps == 2 * plan.steps_per_epoch
    assert recorder.reports[-1].num_tokens == 2 * tokens.num_tokens  # every token, once per epoch


def test_the_engine_serves_the_trained_adapter_as_peft_computes_it(tiny_model: Path, tokens: TokenFile,
                                                                    tmp_path: Path) -> None:
    out = LoRATrainer(tiny_model, CONFIG, device="cpu").train(tokens, tmp_path / "adapter").path
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_num_batched_tokens=256,
                                    max_lora_rank=16, max_adapter_slots=2))
    engine.add_adapter("trained", out)
    reference = PeftReference(tiny_model, {"trained": out})
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for output in engine.generate(["The river runs past", "Seven small boats"], params, ["trained", "trained"]):
        greedy = reference.greedy(output.prompt_token_ids, 6, "trained")  # less an unfinished last character
        assert output.token_ids == greedy[:len(output.token_ids)] and len(greedy) - len(output.token_ids) <= 3
        full = output.prompt_token_ids + output.token_ids
        assert not torch.allclose(reference.logits(full, "trained"), reference.logits(full, None))
