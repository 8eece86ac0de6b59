"""The papers' benchmarks: every evaluation config for a real model dry-runs; multiple choice (GPQA) is
shuffled per row with a fixed seed and graded by the letter a completion chose; ``eval.backend: vllm``
maps the sampling parameters onto vLLM's and is refused where vLLM is not installed (a stand-in
``vllm`` module here: vLLM itself is not run by these tests)."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from recipes.__main__ import CONFIGS
from recipes.common.cli import main
from recipes.common.config import load_raw
from recipes.common.schema import ChoicesSection, DataConfig, EvalConfig
from recipes.evaluate import EvaluateRecipeConfig, run
from rewards.choice import extract_choice
from tests.fake_vllm import fake_vllm_module

GPQA_CHOICES = ChoicesSection("Correct Answer", ["Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
LISTING = "{question}\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
BENCHMARKS = sorted(p for p in (CONFIGS / "evaluate").glob("*.yaml")  # real models (not tiny, not a run's output)
                    if not load_raw(p)[0]["model"]["name_or_path"].startswith(("tiny://", "outputs/")))


# --------------------------------------------------------------------------------------------
# Letter extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("The answer is (C)", "C"),
    ("\\boxed{C}", "C"),
    ("Answer: C", "C"),
    ("Let me think.\nThe density is highest for c).\nAnswer: B", "B"),
    ("... therefore $\\boxed{D}$.", "D"),
    ("\\boxed{\\text{A}}", "A"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{b}", "B"),
    ("\\boxed{C) 10^-4 eV}", "C"),
    ("**Answer:** D", "D"),
    ("The correct answer is: A.", "A"),
    ("the correct answer is option (c)", "C"),
    ("Reasoning...\n(D)", "D"),
    ("Reasoning...\n**B.**", "B"),
    ("Answer: A at first; checking again, \\boxed{C}", "C"),   # the last stated choice
    ("\\boxed{A} was a typo. The answer is (B)", "B"),
    ("A good approach is to compute the density.", None),      # the article "A" is no choice
    ("Answer: a function of the mass", None),
    ("\\boxed{E}", None),                                       # outside A-D
    ("\\boxed{42}", None),
    ("\\boxed{A + B}", None),
    ("\\boxed{C", None),                                        # never closed
    ("", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_extract_choice_respects_the_letters():
    assert extract_choice("Answer: E", "ABCDE") == "E" and extract_choice("Answer: E", "ABCD") is None
    assert extract_choice("\\boxed{C}", "AB") is None


# --------------------------------------------------------------------------------------------
# Options shuffled per row
# --------------------------------------------------------------------------------------------


def test_choice_order_is_pinned():
    """The documented rule, ``random.Random(f"{seed}:{i}").shuffle(range(n))``, with its values pinned:
    a change of the rule (or of Python's string seeding) changes every GPQA number and must be seen."""
    from recipes.common.data import choice_order

    assert [choice_order(0, i, 4) for i in range(4)] == [[2, 3, 1, 0], [3, 2, 0, 1], [2, 0, 1, 3], [0, 1, 3, 2]]
    reference = list(range(4))
    random.Random("7:11").shuffle(reference)
    assert choice_order(7, 11, 4) == reference


def test_gold_letters_spread_over_a_to_d():
    """GPQA lists the correct option first; after the shuffle each letter is gold for about a quarter
    of the 198 GPQA-Diamond rows (binomial: 49.5 +- 6.1; 30..70 is > 3 sd)."""
    from recipes.common.data import choice_order

    counts = Counter("ABCD"[choice_order(0, i, 4).index(0)] for i in range(198))
    assert set(counts) == set("ABCD") and all(30 <= c <= 70 for c in counts.values()), counts


def test_shuffled_rows_keep_every_option_and_point_at_the_correct_one():
    from recipes.common.data import load_split, read_split

    cfg = DataConfig(path="tiny://gpqa", split="train", columns={"question": "Question"}, choices=GPQA_CHOICES,
                     prompt=LISTING)
    raw, rows = read_split(cfg, "train").to_list(), load_split(cfg, "train").to_list()
    assert len(rows) == len(raw) == 12
    for before, after in zip(raw, rows):
        options = [before["Correct Answer"], before["Incorrect Answer 1"], before["Incorrect Answer 2"],
                   before["Incorrect Answer 3"]]
        assert sorted(after[x] for x in "ABCD") == sorted(options)
        assert after[after["answer"]] == before["Correct Answer"]
        assert f"\n{after['answer']}) {before['Correct Answer']}\n" in after["prompt"] + "\n"
    assert len({r["answer"] for r in rows}) == 4  # not always the same letter
    assert load_split(cfg, "train").to_list() == rows  # deterministic
    other = DataConfig(**{**cfg.__dict__, "choices": ChoicesSection(**{**GPQA_CHOICES.__dict__, "seed": 1})})
    assert [r["answer"] for r in load_split(other, "train")] != [r["answer"] for r in rows]


def test_max_rows_keeps_the_order_of_the_rows_it_keeps():
    from recipes.common.data import load_split

    cfg = DataConfig(path="tiny://gpqa", columns={"question": "Question"}, choices=GPQA_CHOICES, prompt=LISTING)
    assert load_split(cfg, "train", max_rows=3).to_list() == load_split(cfg, "train").to_list()[:3]


# --------------------------------------------------------------------------------------------
# The choice grader, end to end
# --------------------------------------------------------------------------------------------


def _gpqa_cfg(tmp_path, *overrides):
    from recipes.common.config import load_config

    return load_config(EvaluateRecipeConfig, CONFIGS / "evaluate" / "tiny_gpqa.yaml",
                       [f"output_dir={tmp_path / 'out'}", *overrides])


def _answering(choose):
    """A stand-in for ``recipes.common.evaluation.generate`` whose completions state ``choose(prompt)``."""
    def generate(model, tokenizer, prompts, *, num_return_sequences=1, **kwargs):
        texts = [f"Reasoning.\nThe answer is ({choose(p)})" for p in prompts for _ in range(num_return_sequences)]
        return texts, [[1, 2] for _ in texts]
    return generate


def _gold_letter(prompt: str) -> str:
    """The letter listing the correct option of a tiny://gpqa prompt (looked up in the fixture)."""
    from recipes.common.tiny.choice import QUESTIONS

    question = prompt.split("\n")[0]
    right = next(r for q, r, _ in QUESTIONS if q == question)
    return next(line[0] for line in prompt.split("\n")[1:] if line[3:] == right)


def test_choice_grader_scores_right_and_wrong_letters(tmp_path, monkeypatch):
    """Through the evaluate recipe (data.choices, the prompt, the grader, pass@k, the letter vote): a
    generator that names the gold letter scores 1, one that always says A scores the share of gold A."""
    import recipes.common.evaluation as evaluation
    from recipes.common.data import load_split

    cfg = _gpqa_cfg(tmp_path, "eval.self_certainty=false", "eval.negative_entropy=false")
    gold = list(load_split(cfg.data, "test")["answer"])
    monkeypatch.setattr(evaluation, "generate", _answering(_gold_letter))
    right = run(cfg)["random tiny Qwen2"]
    assert right["rows"] == 4
    assert right["greedy_accuracy"] == right["sampled_accuracy"] == right["pass@1"] == right["vote_accuracy"] == 1.0
    monkeypatch.setattr(evaluation, "generate", _answering(lambda p: "A"))
    always_a = run(cfg)["random tiny Qwen2"]
    assert always_a["greedy_accuracy"] == always_a["pass@4"] == gold.count("A") / 4 == 0.25


def test_choice_grader_on_a_tiny_model(tmp_path, capsys):
    """The real path with a random tiny model: it generates, the grader reads what it wrote (no letter,
    mostly: wrong), the report has every column."""
    reports = main("evaluate", EvaluateRecipeConfig, run,
                   ["--config", str(CONFIGS / "evaluate" / "tiny_gpqa.yaml"), f"output_dir={tmp_path / 'out'}"])
    report = reports["random tiny Qwen2"]
    for key in ("greedy_accuracy", "sampled_accuracy", "pass@1", "pass@4", "vote_accuracy"):
        assert 0.0 <= report[key] <= 1.0, (key, report)
    assert "sc_auc" in report and report["calibration"]["self_certainty"]["reliability"]
    assert report["rows"] == 4
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["_meta"]["config"]["eval"]["grader"] == "choice"


def test_choice_grader_refuses_answers_that_are_no_letter(tmp_path, capsys):
    config = CONFIGS / "evaluate" / "tiny_gpqa.yaml"
    with pytest.raises(SystemExit) as exit_info:  # arithmetic answers are numbers, not option letters
        main("evaluate", EvaluateRecipeConfig, run, ["--config", str(config), "data.path=tiny://arithmetic",
                                                     "data.columns={}", "data.choices=null", "data.prompt=plain"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "eval.grader" in errors[0] and "gold letter" in errors[0], err


# --------------------------------------------------------------------------------------------
# Every benchmark config dry-runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_config_dry_runs(path, capsys):
    reports = main("evaluate", EvaluateRecipeConfig, run, ["--config", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert f"dry run of {path}" in out
    (report,) = reports.values()
    assert report["rows"] == 4 and "pass@1" in report
    assert "outputs/evaluate" not in out.split("report: ")[-1]  # written in the dry run's directory


def test_choice_dry_run_without_a_choices_section(capsys):
    """A multiple-choice dataset whose options are in the question and whose gold is a letter column."""
    config = CONFIGS / "evaluate" / "qwen2.5-7b-instruct_gpqa_diamond.yaml"
    reports = main("evaluate", EvaluateRecipeConfig, run,
                   ["--config", str(config), "--dry-run", "data.choices=null", "data.prompt=plain",
                    "data.columns={question: prompt_text, answer: gold}"])
    assert next(iter(reports.values()))["rows"] == 4


def test_the_benchmarks_are_there():
    names = {p.name for p in BENCHMARKS}
    assert {"qwen2.5-3b_math500.yaml", "qwen2.5-7b-instruct_aime24.yaml", "qwen2.5-7b-instruct_amc.yaml",
            "qwen2.5-7b-instruct_gpqa_diamond.yaml", "qwen2.5-3b_livecodebench.yaml", "qwen2.5-3b_cruxeval.yaml"} <= names


# --------------------------------------------------------------------------------------------
# eval.backend: vllm (a stand-in module; vLLM itself is not run here)
# --------------------------------------------------------------------------------------------


def test_vllm_backend_refused_without_vllm(tmp_path, monkeypatch, capsys):
    """vLLM not installed: one error line, exit 2, before any model loads."""
    import recipes.evaluate as evaluate

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main("evaluate", EvaluateRecipeConfig, run, ["--config", str(CONFIGS / "evaluate" / "tiny_gpqa.yaml"),
                                                     "eval.backend=vllm", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "eval.backend" in errors[0] and "vLLM is not installed" in errors[0], err


def _tokenizer():
    from recipes.common.schema import ModelConfig
    from recipes.common.modeling import load_tokenizer

    return load_tokenizer(ModelConfig("tiny://qwen2?layers=2&hidden=64&intermediate=256"))


def test_vllm_sampling_parameters_and_outputs(monkeypatch):
    """generate_vllm: the prompt tokens as transformers would see them, greedy as temperature 0, the
    sampled call with n, temperature, top_p, max_tokens and a seed per prompt; ids cut after EOS."""
    from recipes.common.evaluation import generate_vllm, prompt_texts

    tok = _tokenizer()
    eos = tok.eos_token_id
    fake = fake_vllm_module([5, 6, eos], "56", trailing=[eos, 9])
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = fake.LLM(model="m")
    prompts = ["1+2=", [{"role": "user", "content": "3+4="}]]
    texts, ids = generate_vllm(engine, tok, prompts, max_new_tokens=12, do_sample=True, temperature=0.6, top_p=0.95,
                               num_return_sequences=3, seed=40)
    inputs, params = engine.calls[0]
    assert [i["prompt_token_ids"] for i in inputs] == [tok(t, add_special_tokens=False)["input_ids"]
                                                       for t in prompt_texts(tok, prompts)]
    assert [p.kwargs for p in params] == [
        {"n": 3, "max_tokens": 12, "temperature": 0.6, "top_p": 0.95, "seed": 40 + i,
         "skip_special_tokens": True} for i in range(2)]
    assert texts == ["56"] * 6 and ids == [[5, 6, eos]] * 6
    generate_vllm(engine, tok, prompts, max_new_tokens=7, do_sample=False, seed=3)
    assert [(p.kwargs["n"], p.kwargs["temperature"], p.kwargs["top_p"], p.kwargs["max_tokens"])
            for p in engine.calls[1][1]] == [(1, 0.0, 1.0, 7)] * 2


def test_vllm_backend_in_the_evaluate_recipe(tmp_path, monkeypatch):
    """The recipe builds one vllm.LLM from the model's directory (a tiny URI resolved), generates
    with it (transformers' generate is not called) and reads the signals with the transformers model."""
    import recipes.common.evaluation as evaluation
    from recipes.common.config import load_config
    from recipes.common.tiny import resolve_tiny_model

    tok = _tokenizer()
    fake = fake_vllm_module(tok("Answer: B", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], "Answer: B")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: pytest.fail("transformers generate was called"))
    cfg = load_config(EvaluateRecipeConfig, CONFIGS / "evaluate" / "tiny_gpqa.yaml",
                      ["eval.backend=vllm", f"output_dir={tmp_path}", "eval.seed=5", "eval.temperature=0.7"])
    report = run(cfg)["random tiny Qwen2"]
    (engine,) = fake.engines
    assert engine.init_kwargs["model"] == resolve_tiny_model(cfg.model.name_or_path)
    assert (engine.init_kwargs["dtype"], engine.init_kwargs["seed"]) == ("float32", 5)
    greedy, sampled = engine.calls
    assert [p.kwargs["temperature"] for p in greedy[1]] == [0.0] * 4
    assert [(p.kwargs["n"], p.kwargs["temperature"], p.kwargs["seed"]) for p in sampled[1]] == \
        [(4, 0.7, 5 + i) for i in range(4)]
    from recipes.common.data import load_split

    share_b = list(load_split(cfg.data, "test")["answer"]).count("B") / 4
    assert report["greedy_accuracy"] == report["sampled_accuracy"] == share_b
    assert "sc_auc" in report  # signals read by the transformers model on vLLM's token ids


def test_vllm_engine_after_training_reads_the_saved_directory(monkeypatch, tmp_path):
    from recipes.common.schema import ModelConfig
    from recipes.common.evaluation import engine_for

    fake = fake_vllm_module([1], "x")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model = ModelConfig("Qwen/Qwen2.5-3B", dtype="bfloat16", revision="main")
    assert engine_for(EvalConfig(), model) is None  # hf: nothing built
    engine_for(EvalConfig(backend="vllm", seed=9), model)
    engine_for(EvalConfig(backend="vllm"), model, str(tmp_path))
    assert [(e.init_kwargs["model"], e.init_kwargs["revision"], e.init_kwargs["seed"]) for e in fake.engines] == \
        [("Qwen/Qwen2.5-3B", "main", 9), (str(tmp_path), None, 1234)]


def test_vllm_backend_refused_in_a_launch_of_several_processes():
    from recipes.common.errors import ConfigError
    from recipes.common.evaluation import check_backend

    class TwoRanks:
        world = 2

    with pytest.raises(ConfigError, match="one process"):
        check_backend(EvalConfig(backend="vllm"), TwoRanks(), "c.yaml")
    check_backend(EvalConfig(backend="hf"), TwoRanks(), "c.yaml")  # transformers: dealt over the ranks


def test_fixture_questions_have_distinct_options():
    from recipes.common.tiny.choice import QUESTIONS

    assert len(QUESTIONS) == 16
    for question, right, wrong in QUESTIONS:
        assert len({right, *wrong}) == 4, question


def test_dry_run_directory_is_not_the_config_output(tmp_path):
    from recipes.common.dry_run import dry_run_overrides

    out = dry_run_overrides(EvaluateRecipeConfig, CONFIGS / "evaluate" / "qwen2.5-3b_math500.yaml", [], tmp_path)
    assert f"output_dir={Path(tmp_path) / 'out'}" in out and "eval.backend=hf" in out


def test_vllm_backend_refused_where_it_could_not_be_honoured(monkeypatch):
    """A LoRA run saves an adapter vLLM does not load; A-LoL's reward reports generate with
    transformers only: both refused with the key, before anything loads (vLLM stands in as installed)."""
    from recipes.alol import ALoLRecipeConfig
    from recipes.alol import run as alol_run
    from recipes.common.config import load_config
    from recipes.common.errors import ConfigError
    from recipes.rlif import RLIFRecipeConfig

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm_module([1], "x"))
    with pytest.raises(ConfigError, match="LoRA adapter") as err:
        load_config(RLIFRecipeConfig, CONFIGS / "rlif" / "tiny_arithmetic_gold.yaml", ["eval.backend=vllm", "peft={r: 2}"])
    assert err.value.key == "eval.backend"
    cfg = load_config(ALoLRecipeConfig, CONFIGS / "alol" / "tiny_arithmetic.yaml", ["eval.backend=vllm"])
    with pytest.raises(ConfigError, match="transformers only") as err:
        alol_run(cfg)
    assert err.value.key == "eval.backend"
