"""Completion tables carry the internal signals the rewards read (and land in completions.jsonl), and
the saved model's card names the method, its paper, the rewards, the config and the evaluation."""

from __future__ import annotations

import json
from itertools import groupby

import pytest

from recipes.common.cli import main

CONFIG = """
description: tiny Intuitor run with a logged vote
model: {{name_or_path: "{model}", dtype: float32}}
data: {{path: "tiny://arithmetic?n_train=64&n_test=6"}}
rewards:
  - {{name: self_certainty, weight: 1.0}}
  - {{name: negative_entropy, weight: 0.0}}
  - {{name: majority_vote, weight: 0.0}}
eval: {{max_rows: 6, before_training: true, max_new_tokens: 4, batch_size: 6}}
trainer:
  max_steps: 2
  per_device_train_batch_size: 8
  num_generations: 4
  max_completion_length: 4
  learning_rate: 1.0e-4
  logging_steps: 1
  log_completions: true
  report_to: []
  save_strategy: "no"
"""


@pytest.fixture(scope="module")
def intuitor_run(tmp_path_factory, warm_model_dir):
    from recipes.rlif import RLIFRecipeConfig, run

    tmp = tmp_path_factory.mktemp("intuitor")
    config = tmp / "intuitor.yaml"
    config.write_text(CONFIG.format(model=warm_model_dir))
    main("rlif", RLIFRecipeConfig, run, ["--config", str(config), f"trainer.output_dir={tmp / 'out'}"])
    return tmp / "out"


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_completion_table_has_the_signals_the_rewards_read(intuitor_run):
    import pandas as pd

    from rewards import answers_match, extract_answer

    rows = _rows(intuitor_run)
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8  # each generation batch once, with its step
    for r in rows:
        assert set(r) >= {"prompt", "completion", "advantage", "self_certainty", "negative_entropy", "majority_vote",
                          "math_accuracy", "signals/self_certainty", "signals/entropy", "signals/logps",
                          "majority_vote/answer", "majority_vote/voted_answer"}
        assert r["signals/self_certainty"] == r["self_certainty"]  # the mean the reward read, to the bit
        assert r["signals/entropy"] == -r["negative_entropy"]
        assert r["majority_vote/answer"] == extract_answer(r["completion"])
    for _, group in groupby(rows, key=lambda r: (r["step"], r["prompt"])):
        group = list(group)
        assert len(group) == 4 and len({r["majority_vote/voted_answer"] for r in group}) == 1
        voted = group[0]["majority_vote/voted_answer"]
        for r in group:  # the vote reward is 1 exactly for the answers that are the voted one
            won = voted is not None and r["majority_vote/answer"] is not None and answers_match(r["majority_vote/answer"], voted)
            assert r["majority_vote"] == float(won), r
    # TRL's own table (parquet, W&B) has the same columns
    table = pd.read_parquet(intuitor_run / "completions" / "completions_00002.parquet")
    assert {"signals/self_certainty", "majority_vote/voted_answer"} <= set(table.columns)
    assert table["signals/self_certainty"].tolist() == [r["signals/self_certainty"] for r in rows[8:]]


def test_model_card_names_the_method_paper_config_and_evaluation(intuitor_run):
    card = (intuitor_run / "README.md").read_text()
    assert "trained with Intuitor, a method introduced in [Learning to Reason without External Rewards]" in card
    assert "https://huggingface.co/papers/2505.19590" in card and "@article{zhao2025learning," in card
    assert "shao2024deepseekmath" not in card and "DeepSeekMath" not in card  # not TRL's GRPO citation
    assert "| self_certainty | 1.0 | Intuitor (arXiv 2505.19590) |" in card
    assert "| majority_vote | 0.0 (logged only) | TTRL (arXiv 2504.16084) |" in card
    assert "`python -m recipes.rlif --config" in card and "tiny Intuitor run with a logged vote" in card
    config = (intuitor_run / "config.yaml").read_text()
    assert f"```yaml\n{config}```" in card
    table = (intuitor_run / "eval.md").read_text().strip()
    assert table.startswith("| model |") and table in card and "| after |" in table and "| before |" in table
    assert card.index("## Evaluation") < card.index("## Citations")  # our sections before TRL's citations
    assert "- intuitor" in card.split("---")[1]  # a tag in the card's metadata


def test_vote_samples_table_keeps_the_trained_rows(tmp_path, tiny_model_dir):
    """TTRL with vote_samples: the vote reads 8 completions a prompt, the table holds the 4 trained ones,
    and the voted-answer column stays aligned with them."""
    from recipes.rlif import RLIFRecipeConfig, run

    config = tmp_path / "ttrl.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir).replace(
        "  - {name: self_certainty, weight: 1.0}\n  - {name: negative_entropy, weight: 0.0}\n"
        "  - {name: majority_vote, weight: 0.0}", "  - {name: majority_vote, weight: 1.0}"))
    out = tmp_path / "out"
    main("rlif", RLIFRecipeConfig, run, ["--config", str(config), f"trainer.output_dir={out}", "trainer.vote_samples=8",
                                         "trainer.max_steps=1", "eval.before_training=false"])
    rows = _rows(out)
    assert len(rows) == 8
    for r in rows:
        assert set(r) >= {"majority_vote/answer", "majority_vote/voted_answer", "majority_vote", "advantage"}
        assert r["majority_vote/answer"] is None or isinstance(r["majority_vote/answer"], str)
    card = (out / "README.md").read_text()
    assert "trained with TTRL" in card and "@article{zuo2025ttrl," in card


def test_vote_rewards_log_answers_and_ic_through_trl_log_extra():
    import torch

    from rewards import ConsistencyVote, MajorityVote

    logged: dict = {}
    rewards = MajorityVote()(["q"] * 4 + ["r"] * 2, ["7", "7.0", "8", "no", "1", "2"], log_extra=logged.__setitem__)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert logged == {"majority_vote/answer": ["7", "7.0", "8", None, "1", "2"],
                      "majority_vote/voted_answer": ["7", "7", "7", "7", "1", "1"]}
    ic = [{"ic_hard": torch.tensor([[v]]), "ic_layers": [1], "ic_answer_found": True} for v in (0.2, 0.2, 0.9)]
    logged.clear()
    assert ConsistencyVote()(["q"] * 3, ["7", "7", "8"], token_signals=ic, log_extra=logged.__setitem__) == [0.0, 0.0, 1.0]
    assert logged["consistency_vote/voted_answer"] == ["8"] * 3
    assert logged["consistency_vote/ic"] == pytest.approx([0.2, 0.2, 0.9])
    assert MajorityVote()(["q"], ["7"]) == [1.0]  # called outside TRL (no log_extra): nothing to log


def test_vote_samples_columns_keep_the_trained_rows():
    """Columns a reward logged over all N completions of each group keep the M trained rows; columns
    logged before the vote (M rows already) are left alone."""
    import types
    from collections import defaultdict

    from trainers.vote import VoteSamplesMixin

    fake = types.SimpleNamespace(args=types.SimpleNamespace(vote_samples=4), num_generations=2,
                                 _pending_extra_logs=defaultdict(list))
    fake._pending_extra_logs["signals/entropy"] = [0.1, 0.2, 0.3, 0.4]  # before: 2 groups x M=2
    before = {k: len(v) for k, v in fake._pending_extra_logs.items()}
    fake._pending_extra_logs["majority_vote/answer"] = ["a0", "a1", "x", "x", "b0", "b1", "y", "y"]  # 2 groups x N=4
    VoteSamplesMixin._keep_trained_columns(fake, before, groups=2)
    assert fake._pending_extra_logs == {"signals/entropy": [0.1, 0.2, 0.3, 0.4], "majority_vote/answer": ["a0", "a1", "b0", "b1"]}
