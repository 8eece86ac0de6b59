"""How well CLUE separates right from wrong samples on the tiny world, for three end positions of the delta.

The warm-up model (``tiny://qwen2-arith``) samples ``--samples`` completions for each of ``--rows``
held-out additions (T = 0.9), per seed. Each completion's hidden-state delta (every layer, from the
last prompt token) is read with the CLUE hooks (:class:`trainers.clue.HiddenDelta`) ending at

* ``last``: the completion's last token (the default without ``</think>``; docs/METHODS.md "CLUE"),
* ``answer_end``: the last token of the answer's first emission (``trainers.lens.answer_token_indices``),

and scored with centroids cross-fit on the other half of the prompts (:func:`recipes.common.evaluation.clue_column`,
what ``eval.clue`` reports). Prints JSON: per seed the sampled and vote accuracy, and per position
the Mann-Whitney AUROC (right > wrong) and the accuracy of the top-scored sample per prompt.

    python benchmarks/clue_positions.py [--rows 200] [--samples 8] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.common.config import load_config  # noqa: E402
from recipes.common.data import load_split  # noqa: E402
from recipes.evaluate import EvaluateRecipeConfig  # noqa: E402
from recipes.common.evaluation import (clue_column, correctness, generate, mann_whitney_auc, prompt_texts,  # noqa: E402
                                selected_accuracy, vote_accuracy)
from recipes.common.modeling import load_model, load_tokenizer  # noqa: E402
from trainers.clue import HiddenDelta, reasoning_positions  # noqa: E402
from trainers.lens import answer_token_indices  # noqa: E402
from trainers.signals import pack_prompt_completion  # noqa: E402


@torch.no_grad()
def deltas_at(model, tok, prompt_ids, ids, spans, batch=256):
    reader, out = HiddenDelta(model), []
    try:
        for i in range(0, len(ids), batch):
            x, m, p = pack_prompt_completion(prompt_ids[i : i + batch], ids[i : i + batch], tok.pad_token_id)
            reader.arm(spans[i : i + batch], x.shape[1] - p)
            model.model(input_ids=x, attention_mask=m)
            out += list(reader.collect())
    finally:
        reader.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    cfg = load_config(EvaluateRecipeConfig, ROOT / "configs/evaluate/tiny_arithmetic.yaml", [])
    test = load_split(cfg.data, cfg.data.eval_split or cfg.data.split, args.rows, cfg.source)
    model, tok = load_model(cfg.model).eval(), load_tokenizer(cfg.model)
    n = args.samples
    report = {"model": cfg.model.name_or_path, "rows": len(test), "samples": n}
    for seed in args.seeds:
        torch.manual_seed(seed)
        prompts = list(test["prompt"])
        texts, ids = generate(model, tok, prompts, max_new_tokens=16, batch_size=64, do_sample=True, temperature=0.9,
                              num_return_sequences=n)
        correct = correctness(texts, [a for a in test["answer"] for _ in range(n)])
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(tok, prompts) for _ in range(n)]
        answers = [answer_token_indices(tok, c, None)[0] for c in ids]
        spans = {"last": reasoning_positions(tok, ids),
                 "answer_end": [(0, a[-1] + 1 if a else len(c)) for a, c in zip(answers, ids)]}
        row = {"sampled_accuracy": sum(correct) / len(correct),
               "vote_accuracy": vote_accuracy(texts, list(test["answer"]), n)}
        for name, span in spans.items():
            scores = clue_column(deltas_at(model, tok, prompt_ids, ids, span), correct, n)
            right = [s for s, ok in zip(scores, correct) if ok and s is not None]
            wrong = [s for s, ok in zip(scores, correct) if not ok and s is not None]
            row[name] = {"auc": mann_whitney_auc(right, wrong), "selected_accuracy": selected_accuracy(scores, correct, n)}
        report[f"seed_{seed}"] = row
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
