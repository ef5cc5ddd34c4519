"""Detokenising one streamed answer with a stop string, step by step as the engine does (check_stop, then
the stream's delta): the whole-output decoding it replaced (tests/engine/reference_output.py) against the
incremental one (node/engine/output.py), on the tiny model's byte-level tokenizer and a byte-fallback one
(English text, and one long run of byte tokens: 4-byte characters, each unfinished for 3 steps of 4).
Per answer length: step-thread seconds for the whole answer, the last 100 steps' mean, and the ids given
to the tokenizer's decode in all; ratios old/new of the same run. Prints a table and writes
bench/results/detokenize.json.

    python bench/detokenize.py [--lengths 1000 4000 8000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import PreTrainedTokenizerBase

from node.devkit import train_tokenizer
from node.devkit.corpus import STYLES, TEXT
from node.engine.logprob import TokenLogprob
from node.engine.output import OutputProcessor
from node.engine.sampling import SamplingParams
from node.engine.sequence import Sequence
from tests.engine.reference_output import ReferenceOutputProcessor
from tests.fixtures.tokenizers import byte_fallback_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "detokenize.json"
CORPUS = " ".join([TEXT, *STYLES.values(), "中文 café ☃ 🌊"])


class Counted:
    """The tokenizer's decode, counting the ids it is given."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.num_ids, decode = 0, tokenizer.decode

        def counted(ids: Any, *args: Any, **kwargs: Any) -> Any:
            self.num_ids += len(ids)
            return decode(ids, *args, **kwargs)

        tokenizer.decode = counted  # type: ignore[method-assign]


def _answer(outputs: OutputProcessor | ReferenceOutputProcessor, ids: list[int]) -> tuple[float, float, str]:
    seq = Sequence("r", [1], SamplingParams(max_tokens=len(ids), stop=("NEVER SAID",)), None, 0)
    sent, last = list[str](), list[float]()
    start = time.perf_counter()
    for k, token in enumerate(ids):
        step = time.perf_counter()
        seq.append(token, TokenLogprob(token, -0.5, ()))
        outputs.check_stop(seq, is_streamed=True)
        delta = outputs.delta(seq)
        sent.append(delta.text if delta else "")
        if k >= len(ids) - 100:
            last.append(time.perf_counter() - step)
    return time.perf_counter() - start, sum(last) / len(last) * 1e3, "".join(sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 8000])
    args = parser.parse_args()
    cases = [("byte_level (tiny)", lambda: train_tokenizer(512), CORPUS),
             ("byte_fallback", byte_fallback_tokenizer, CORPUS),
             ("byte_fallback, one run", byte_fallback_tokenizer, "\U0001f30a" * 2_000)]  # 4 byte tokens each
    rows = []
    for name, make, text in cases:
        tokenizer = make()
        counter = Counted(tokenizer)
        eos = frozenset({tokenizer.eos_token_id})
        corpus = tokenizer.encode(text, add_special_tokens=False)
        for n in args.lengths:
            ids = (corpus * (n // len(corpus) + 1))[:n]
            result: dict[str, Any] = {"tokenizer": name, "tokens": n}
            texts = []
            for kind, cls in (("old", ReferenceOutputProcessor), ("new", OutputProcessor)):
                counter.num_ids = 0
                total, last_ms, text = _answer(cls(tokenizer, eos, n + 10), ids)
                result |= {f"{kind}_s": round(total, 4), f"{kind}_last100_ms": round(last_ms, 4),
                           f"{kind}_ids_decoded": counter.num_ids}
                texts.append(text)
            result["same_text"] = texts[0] == texts[1]
            result["ratio_s"] = round(result["old_s"] / result["new_s"], 1)
            result["ratio_ids"] = round(result["old_ids_decoded"] / result["new_ids_decoded"], 1)
            rows.append(result)
            print(f"{name:22} {n:>6} tokens  old {result['old_s']:8.3f} s ({result['old_last100_ms']:7.3f} ms/step at "
                  f"the end, {result['old_ids_decoded']:>11,} ids)  new {result['new_s']:7.3f} s "
                  f"({result['new_last100_ms']:6.3f} ms/step, {result['new_ids_decoded']:>9,} ids)  "
                  f"x{result['ratio_s']} time x{result['ratio_ids']} ids  same text: {result['same_text']}",
                  flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"bench": "detokenize", "rows": rows}, indent=2) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
