"""Gemma 2 and Gemma 3 (text) against transformers + peft: soft-capped attention and logits,
alternating sliding-window and global layers served past the window, (1 + w) sandwich norms, the
embedding scale, query_pre_attn_scalar, and Gemma 3's q/k norms and per-layer-type rope bases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.devkit import make_tiny_model
from node.devkit.tiny_adapter import ALL_TARGETS
from node.models.attention import AttentionBatch, build_group
from node.models.config import ModelConfig
from tests.models.padded_decode import padded_decode
from tests.models.parity import assert_matches_peft, train_adapters

LOCAL_GLOBAL = ["sliding_attention", "full_attention"]
VARIANTS = {
    # caps small enough to bite on a tiny model's scores and logits
    "gemma2-softcaps": dict(arch="gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=4.0,
                            query_pre_attn_scalar=24, sliding_window=6),
    "gemma3": dict(arch="gemma3_text", query_pre_attn_scalar=24, sliding_window=6, layer_types=LOCAL_GLOBAL),
    "gemma3-linear-global-rope": dict(arch="gemma3_text", sliding_window=6, layer_types=LOCAL_GLOBAL, num_kv_heads=1,
                                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 1e6},
                                                       "sliding_attention": {"rope_type": "default",
                                                                             "rope_theta": 1e4}}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gemma_with_and_without_adapters_matches_peft_past_its_window(variant: str, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", random_norms=True, seed=7, **VARIANTS[variant])  # type: ignore[arg-type]
    cfg = ModelConfig.from_folder(model)
    assert [layer.window for layer in cfg.layers] == [6, None]
    # prompts of 7-10 tokens and 10 more: every sliding layer masks keys that fell out of its window
    assert_matches_peft(model, train_adapters(model, tmp_path, ALL_TARGETS))


def test_the_padded_graph_decode_of_a_windowed_softcapped_model_matches_the_eager_step(tmp_path: Path) -> None:
    """The dense decode group (what a CUDA graph replays) masks the window and caps the scores as
    the eager step does."""
    model = make_tiny_model(tmp_path / "model", **(VARIANTS["gemma2-softcaps"] | {"sliding_window": 4}))  # type: ignore[arg-type]
    step = padded_decode(model)  # context longer than the window
    batch, runner = step.batch, step.runner
    group = build_group([1, 1, 1], batch.context_lens, batch.block_tables, 0, torch.device("cpu"))
    with torch.inference_mode():
        eager = runner.model(torch.tensor(batch.token_ids), torch.tensor(batch.positions),
                             AttentionBatch(torch.tensor(batch.kv_indices), (group,)), runner.kv_caches)
        padded = step.graphs.run(batch)  # bucket 4: one padding row
    assert torch.allclose(padded, eager, atol=1e-5)
