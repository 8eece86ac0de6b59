"""Held-out evaluation by a reward: greedy responses scored, with length and distinct-n diversity.

What the A-LoL paper reports per test split (reward of the greedy response under the test-time
reward model, response length, distinct-1/2). Accuracy is one such reward (``math_accuracy``).
"""

from __future__ import annotations

from datasets import Dataset

from trainers.distributed import Ranks, merge_shards

from .generation import generate
from .schema import EvalConfig


def distinct_n(texts: list[str], n: int, tokenize=str.split) -> float:
    """Distinct n-grams / all n-grams over all responses (whitespace tokens; characters for 1-word answers).

    >>> distinct_n(["a b a b"], 2)
    0.6666666666666666
    """
    grams, total = set(), 0
    for text in texts:
        tokens = tokenize(text)
        for i in range(len(tokens) - n + 1):
            grams.add(tuple(tokens[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def reward_report(model, tokenizer, data: Dataset, rewards: list, weights: list[float], cfg: EvalConfig,
                  desc: str = "eval", ranks: Ranks | None = None, respond=None) -> dict | None:
    """Mean weighted reward of greedy responses on ``data``, each reward's mean, length, distinct-1/2.

    ``ranks`` (default: this process alone) deals the prompts over the processes of a launch: each
    generates its share, the main process scores every response and reports (``None`` elsewhere).
    ``respond(prompts, desc) -> (texts, token ids)`` generates a share's responses (default: plain
    greedy ``generate``; A-LoL passes its own prompt layout and stop rule)."""
    prompts = list(data["prompt"])
    ranks = ranks or Ranks(alone=True)
    mine = ranks.shard(list(range(len(prompts))))
    if respond is None:
        def respond(share, desc):
            return generate(model, tokenizer, share, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                            do_sample=False, desc=desc)
    texts, ids = respond([prompts[i] for i in mine], f"{desc} greedy")
    parts = ranks.gather_to_main((mine, list(zip(texts, ids))))
    if not ranks.main:
        return None
    texts, ids = map(list, zip(*merge_shards(parts, len(prompts)))) if prompts else ([], [])
    columns = {c: list(data[c]) for c in data.column_names if c not in ("prompt", "completion")}
    report: dict = {"rows": len(prompts)}
    total = [0.0] * len(texts)
    for func, weight in zip(rewards, weights):
        values = [float("nan") if v is None else float(v) for v in func(prompts=prompts, completions=texts, **columns)]
        if len(rewards) > 1:
            report[getattr(func, "__name__", "reward")] = sum(values) / max(len(values), 1)
        total = [t + weight * v for t, v in zip(total, values)]
    report["reward"] = sum(total) / max(len(total), 1)
    report["length"] = sum(len(i) for i in ids) / max(len(ids), 1)
    report["distinct_1"] = distinct_n(texts, 1)
    report["distinct_2"] = distinct_n(texts, 2)
    return report
