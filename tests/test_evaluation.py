"""The evaluator: self-consistency, IC-weighted self-consistency and signal separation."""

import json
import math

import pytest
import torch

from recipes.common.data import load_split
from recipes.common.evaluation import evaluate_model, internal_signals, separation, vote_accuracy
from recipes.common.modeling import load_model, load_tokenizer
from recipes.common.schema import DataConfig, EvalConfig, ModelConfig
from rewards import InternalConsistency
from trainers.lens import LogitLens, locate_answers
from trainers.signals import pack_prompt_completion


def test_sc_and_sc_ic_voting_on_a_hand_built_example():
    # 2 questions x 4 samples. Q1: the plurality (5) is wrong, the IC-weighted vote (4) is right.
    # Q2: right by plurality and by IC. Unparseable answers never vote.
    texts = ["4", "5", "5", "no answer", "\\boxed{7}", "7.0", "8", "x"]
    gold = ["4", "7"]
    ic = [0.9, 0.3, 0.4, 1.0, 0.5, 0.5, 0.9, None]
    assert vote_accuracy(texts, gold, 4) == 0.5
    assert vote_accuracy(texts, gold, 4, ic) == 1.0
    assert vote_accuracy(texts, gold, 4, [0.1, 0.3, 0.4, 1.0, 0.4, 0.4, 0.9, None]) == 0.0  # 0.8 < 0.9 for 8


def test_separation_skips_unscored_answers():
    out = separation([0.9, None, 0.2, 0.4], [True, True, False, False], "ic")
    assert out == {"ic_correct": 0.9, "ic_incorrect": 0.30000000000000004, "ic_auc": 1.0, "ic_effect": 1.0}
    assert math.isnan(separation([0.1], [True], "sc")["sc_auc"])


def test_internal_signals_across_batches_equal_one_pass(warm_model_dir):
    cfg = ModelConfig(name_or_path=warm_model_dir, dtype="float32")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    prompts = [p for p in ("12+34=", "7+5=", "40+2=") for _ in range(3)]
    torch.manual_seed(0)
    completion_ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                      for t in ("46", "45", "46", "12", "12", "x", "42", "24", "4")]
    for mode in ("hard", "soft", "candidates"):
        ic = InternalConsistency(mode, layers=[1, 2])
        batched = internal_signals(model, tok, prompts, completion_ids, temperature=1.0, batch_size=2, consistency=ic)
        # reference: one forward over everything, through the trainer's path (LogitLens.signals)
        lens = LogitLens(model, [1, 2], vocab_size=len(tok))
        indices, found, answer_ids = locate_answers(tok, completion_ids)
        ids, mask, p = pack_prompt_completion([tok(x, add_special_tokens=False)["input_ids"] for x in prompts],
                                              completion_ids, tok.pad_token_id)
        lens.arm(indices, ids.shape[1] - p)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        states, counts = lens.collect()
        lens.remove()
        signals = lens.signals(states, counts, answer_ids, found, (mode,), prompts=prompts)
        expected = [ic.reduce(s) for s in signals]
        assert batched["internal_consistency"] == pytest_approx(expected), mode
        assert len(batched["self_certainty"]) == 9


def pytest_approx(values):
    import pytest

    return pytest.approx(values, abs=1e-5)


def test_tiny_world_evaluation_is_deterministic_and_reports_sc_ic(warm_model_dir):
    cfg = ModelConfig(name_or_path=warm_model_dir, dtype="float32")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    data = load_split(DataConfig(path="tiny://arithmetic?ops=add&digits=2"), "test", max_rows=24)
    ev = EvalConfig(max_rows=24, batch_size=24, max_new_tokens=6, num_samples=5, self_certainty=True,
                    internal_consistency=True, ic_layers=[1, 2])
    first, second = evaluate_model(model, tok, data, ev), evaluate_model(model, tok, data, ev)
    assert first == second
    for key in ("greedy_accuracy", "sampled_accuracy", "vote_accuracy", "ic_vote_accuracy", "ic_auc", "sc_auc",
                "ic_correct", "ic_incorrect"):
        assert key in first, key
    assert 0 <= first["ic_correct"] <= 1 and 0 <= first["vote_accuracy"] <= 1


def test_pass_at_k_equals_the_subset_probability():
    from itertools import combinations

    from recipes.common.evaluation import pass_at_k

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                flags = [True] * c + [False] * (n - c)
                subsets = list(combinations(range(n), k))
                exact = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - exact) < 1e-12, (n, c, k)


def test_auroc_and_effect_size_by_hand():
    from recipes.common.evaluation import mann_whitney_auc

    right, wrong = [0.9, 0.5, 0.5], [0.5, 0.1]
    # pairs: (0.9>0.5, 0.9>0.1, 0.5=0.5, 0.5>0.1, 0.5=0.5, 0.5>0.1) = 4 wins + 2 ties of 6
    assert mann_whitney_auc(right, wrong) == (4 + 0.5 * 2) / 6
    out = separation(right + wrong, [True] * 3 + [False] * 2, "ne")
    assert out["ne_auc"] == 5 / 6 and abs(out["ne_effect"] - (2 * 5 / 6 - 1)) < 1e-12


def test_reliability_table_and_histogram():
    from recipes.common.evaluation import reliability

    values = [0.1 * i for i in range(10)] + [None]
    correct = [i >= 5 for i in range(10)] + [True]
    out = reliability(values, correct, bins=2, hist_bins=5)
    assert [r["accuracy"] for r in out["reliability"]] == [0.0, 1.0]
    assert sum(out["histogram"]["correct"]) == 5 and sum(out["histogram"]["incorrect"]) == 5
    assert out["histogram"]["incorrect"][:2] == [2, 2] and out["histogram"]["correct"][-1] == 2


def test_compare_and_plots_from_recorded_runs(tmp_path, capsys):
    import json

    from recipes.evaluate import compare
    from recipes.common.evaluation import write_report
    from recipes.plot import main as plot_main

    runs = []
    for name, slope in (("run_a", 0.01), ("run_b", 0.02)):
        run = tmp_path / name
        (run / "checkpoint-4").mkdir(parents=True)
        history = [{"step": s, "loss": 1.0 - slope * s, "rewards/math_accuracy/mean": 0.5 + slope * s,
                    "rewards/self_certainty/mean": 6.0 + slope, "signals/self_certainty/mean": 6.0 + slope,
                    "entropy": 0.3, "completions/mean_length": 4.0, "kl": 0.001 * s} for s in range(1, 5)]
        (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        runs.append(run)
    report = {"greedy_accuracy": 0.5, "sc_auc": 0.6, "calibration": {"self_certainty": {
        "histogram": {"edges": [0, 1, 2], "correct": [3, 4], "incorrect": [5, 1]}}}}
    write_report({"model": report}, runs[0], meta={"models": {"model": "x"}})
    written = plot_main([str(r) for r in runs] + ["--out", str(tmp_path / "plots")])
    names = {p.name for p in written}
    assert {"rewards.png", "accuracy.png", "self_certainty.png", "entropy.png", "completion_length.png", "kl.png",
            "loss.png", "calibration_model_self_certainty.png"} <= names
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert (runs[0] / "eval.md").read_text().splitlines()[2] == "| model | 0.500 | 0.600 |"
    table = compare([str(runs[0]), str(runs[0] / "eval.json")])
    assert "run_a/model" in table and "greedy_accuracy" in table and "calibration" not in table


def test_hub_dataset_falls_back_to_a_local_copy(tmp_path, caplog):
    from recipes.common.schema import DataConfig

    local = tmp_path / "gsm8k_test.jsonl"
    local.write_text('{"question": "1+1?", "answer": "so 2.\\n#### 2"}\n')
    cfg = DataConfig(path="openai/gsm8k", name="main", split="test", fallback=str(local))
    with caplog.at_level("WARNING", logger="intrinsic"):
        data = load_split(cfg, "test")
    assert data["answer"] == ["so 2.\n#### 2"] and "fallback" in caplog.text


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_evaluate_recipe_under_two_process_launch(tmp_path, warm_model_dir, engine):
    """`accelerate launch -m recipes.evaluate`: each process generates and reads signals for half the
    rows, the main process reports; greedy answers (no sampling noise) give the single-process
    accuracy only if the merged completions line up with their rows."""
    from recipes.common.cli import main
    from recipes.evaluate import EvaluateRecipeConfig, run
    from tests.launcher import launch_recipe

    overrides = [f"model.name_or_path={warm_model_dir}", "compare={}", "label=model", "eval.max_rows=40", "eval.num_samples=3",
                 "eval.self_certainty=true", "eval.internal_consistency=true", "eval.ic_mode=candidates"]
    single = main("evaluate", EvaluateRecipeConfig, run, ["--config", "configs/evaluate/tiny_arithmetic.yaml",
                                                          *overrides, f"output_dir={tmp_path / 'single'}"])["model"]
    launch_recipe("evaluate", "configs/evaluate/tiny_arithmetic.yaml", engine, *overrides,
                  f"output_dir={tmp_path / 'launched'}")
    launched = json.loads((tmp_path / "launched" / "eval.json").read_text())
    assert set(launched) - {"_meta"} == {"model"}
    launched = launched["model"]
    assert launched["processes"] == 2 and launched["rows"] == single["rows"] == 40
    assert 0.2 < single["greedy_accuracy"] < 1 and launched["greedy_accuracy"] == single["greedy_accuracy"]
    for key in ("sampled_accuracy", "vote_accuracy", "ic_vote_accuracy", "sc_auc", "ic_auc", "pass@3"):
        assert key in launched and 0 <= launched[key] <= 1
