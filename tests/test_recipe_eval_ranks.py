"""The recipes' own before/after evaluation is dealt over the processes of a launch (as
``recipes.evaluate`` does) and gives the numbers one process gives."""

from __future__ import annotations

import json


def test_sft_before_after_evaluation_dealt_over_two_processes(tmp_path, tiny_model_dir):
    """`accelerate launch` (DDP, 2 processes) of the SFT recipe: both evaluations report 2 processes
    and the accuracy one process computes. The gold answers are made from the starting model's own
    greedy answers (two rows in three; the third is wrong) and the learning rate is 0, so the exact
    accuracy is known for both evaluations and comes out only if every merged answer meets its row."""
    from recipes.common.config import load_config
    from recipes.common.data import load_split
    from recipes.common.evaluation import evaluate_model
    from recipes.common.generation import generate
    from recipes.common.modeling import load_model, load_tokenizer
    from recipes.sft import SFTRecipeConfig
    from rewards import extract_answer
    from tests.launcher import launch_recipe

    # A random tied-embedding model repeats the prompt's last character: each row's greedy answer is its own digit.
    rows = [{"question": f"{a}+{b}={(7 * a + b) % 10}", "answer": "", "completion": str(a + b)}
            for a in range(10, 30) for b in (11, 47)]
    data = tmp_path / "rows.jsonl"
    out = tmp_path / "ddp"
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.path={data}", "trainer.max_steps=2",
                 "trainer.learning_rate=0.0", "trainer.warmup_steps=0", "trainer.per_device_train_batch_size=4",
                 f"trainer.output_dir={out}", "eval.max_rows=null", "eval.before_training=true", "eval.sampled=false",
                 "eval.batch_size=8"]
    model_cfg = load_config(SFTRecipeConfig, "configs/sft/tiny_arithmetic.yaml", overrides[:1]).model
    model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg)
    texts, _ = generate(model, tokenizer, [r["question"] for r in rows], max_new_tokens=8, batch_size=8,
                        do_sample=False)
    for i, (row, text) in enumerate(zip(rows, texts)):
        row["answer"] = (extract_answer(text) or "99999") if i % 3 else "99999"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SFTRecipeConfig, "configs/sft/tiny_arithmetic.yaml", overrides)
    test = load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_rows)
    single = evaluate_model(model, tokenizer, test, cfg.eval, desc="single")
    expected = sum(r["answer"] != "99999" for r in rows) / len(rows)
    assert single["greedy_accuracy"] == expected >= 0.6, (single, expected)

    launch_recipe("sft", "configs/sft/tiny_arithmetic.yaml", "ddp", *overrides)
    launched = json.loads((out / "eval.json").read_text())
    for label in ("before", "after"):
        assert launched[label]["processes"] == 2 and launched[label]["rows"] == len(rows)
        assert launched[label]["greedy_accuracy"] == expected, (label, launched[label], expected)


def test_multi_process_paper_configs_allow_a_long_evaluation():
    """Paper configs launched on several processes wait in collectives while held-out evaluation
    runs: their ``ddp_timeout`` exceeds the default 30 minutes."""
    from recipes.__main__ import config_files
    from recipes.common.config import load_raw

    checked = 0
    for recipe, paths in config_files().items():
        for path in paths:
            raw = load_raw(path)[0]
            if recipe == "evaluate" or raw["model"]["name_or_path"].startswith("tiny://") or \
                    raw.get("launch", "").endswith("single.yaml"):
                continue
            assert raw["trainer"].get("ddp_timeout", 1800) >= 7200, path
            checked += 1
    assert checked >= 8
