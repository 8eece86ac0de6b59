"""code_accuracy, the code graders of the evaluator, the tiny code fixtures, and the whole tiny code path
(one RLIF step with code_accuracy, then pass@k evaluation)."""

from __future__ import annotations

import json
import pickle

import pytest

import recipes.common.evaluation as evaluation
from recipes.common.schema import EvalConfig
from recipes.common.tiny import resolve_tiny_dataset
from recipes.common.tiny.code import OUTPUT_PREDICTION, PROBLEMS
from rewards import CodeAccuracy, build_reward, extract_output_prediction, extract_program, output_prediction_correct
from rewards.code import grade_rows
from rewards.sandbox import LocalSandbox, Test

pytestmark = pytest.mark.timeout(300)

SMALL = {"timeout": 3, "memory_mb": 256, "workers": 2}


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\nDone."


def stdin_tests(tests) -> str:
    return json.dumps([{"input": i + "\n", "output": o + "\n"} for i, o in tests])


def test_every_reference_program_passes_and_every_wrong_one_fails():
    reward = CodeAccuracy(mode="all_pass", **SMALL)
    right = reward(prompts=[""] * len(PROBLEMS), completions=[fenced(p) for _, p, _, _ in PROBLEMS],
                   tests=[stdin_tests(t) for _, _, t, _ in PROBLEMS])
    wrong = reward(prompts=[""] * len(PROBLEMS), completions=[w for _, _, _, w in PROBLEMS],
                   tests=[stdin_tests(t) for _, _, t, _ in PROBLEMS])
    assert right == [1.0] * len(PROBLEMS)
    assert wrong == [0.0] * len(PROBLEMS)


def test_fraction_all_pass_and_assert_style_tests():
    tests = ["assert inc(1) == 2", "assert inc(-1) == 0", "assert inc(10) == 12"]
    completions = ["def inc(x):\n    return x + 1", "```py\ndef inc(x):\n    return 2\n```", "def inc(x) return"]
    fraction = CodeAccuracy(**SMALL)(prompts=[""] * 3, completions=completions, tests=[json.dumps(tests)] * 3)
    assert fraction == pytest.approx([2 / 3, 1 / 3, 0.0])
    all_pass = build_reward("code_accuracy", mode="all_pass", **SMALL)(
        prompts=[""] * 3, completions=completions, tests=[tests] * 3)
    assert all_pass == [0.0, 0.0, 0.0]
    assert CodeAccuracy(**SMALL)(prompts=[""], completions=["def inc(x):\n    return x + 1"],
                                 tests=["assert inc(1) == 2\nassert inc(2) == 3"]) == [1.0]


def test_rows_without_usable_tests_are_skipped_and_missing_column_is_an_error():
    reward = CodeAccuracy(**SMALL)
    assert reward(prompts=["", ""], completions=["print(1)", "print(1)"], tests=["[]", '[{"x": 1}]']) == [None, None]
    with pytest.raises(KeyError, match="'tests' column"):
        reward(prompts=[""], completions=["print(1)"], answer=["1"])
    with pytest.raises(ValueError, match="mode"):
        CodeAccuracy(mode="most")


def test_reward_pickles_and_takes_a_user_sandbox():
    reward = pickle.loads(pickle.dumps(CodeAccuracy(mode="all_pass", **SMALL)))
    assert reward(prompts=[""], completions=["print(input())"], tests=['[{"input": "7", "output": "7"}]']) == [1.0]
    user = CodeAccuracy(sandbox="tests.test_code_reward.AlwaysPass")
    assert user(prompts=[""], completions=["anything"], tests=['["assert False"]']) == [1.0]
    with pytest.raises(ValueError, match="Sandbox subclass"):
        CodeAccuracy(sandbox="tests.test_code_reward.SMALL")


class AlwaysPass(LocalSandbox):
    """A user's sandbox by dotted path (a remote service would subclass Sandbox the same way)."""

    def run_many(self, jobs):
        from rewards.sandbox import Result

        return [[Result("pass") for _ in tests] for _, tests in jobs]


def test_program_extraction():
    assert extract_program("```python\nprint(1)\n```") == "print(1)\n"
    assert extract_program("print(2)") == "print(2)"
    assert extract_program("a\n```python\nprint(1)\n```\n```python\nprint(3)") == "print(3)"  # unclosed last fence
    assert extract_program("```\nx = 1\n```") == "x = 1\n"


def test_output_prediction_grading():
    box = LocalSandbox(**SMALL)
    assert extract_output_prediction("so [ANSWER]assert f(3) == 7[/ANSWER]") == "7"
    assert extract_output_prediction("reasoning...\n'cba'") == "'cba'"
    assert output_prediction_correct("{2, 1}", "{1, 2}") and not output_prediction_correct("[1, 2]", "(1, 2)")
    assert output_prediction_correct("1.0", "1") and not output_prediction_correct("", "1")
    assert not output_prediction_correct("1", "[1]") and not output_prediction_correct("x + 1", "2")
    code = "def f(x):\n    return set()"
    assert output_prediction_correct("set()", "set()", code, box)        # no literal: executed
    assert not output_prediction_correct("{1}", "set()", code, box)
    assert not output_prediction_correct("f(0)", "set()", code, box)      # calling f would make it trivial


def test_cruxeval_fixture_outputs_are_what_the_functions_return():
    box = LocalSandbox(**SMALL)
    results = box.run_many([(code, [Test(check=f"assert f({arg}) == {out}")]) for code, arg, out in OUTPUT_PREDICTION])
    assert all(r[0].passed for r in results), [r[0].stderr for r in results if not r[0].passed]
    rows = resolve_tiny_dataset("tiny://cruxeval", "train").to_list()
    assert grade_rows([r["completion"] for r in rows], rows, "output_prediction", box) == [True] * len(rows)
    wrong = [r["completion"].replace("[/ANSWER]", " + [0][/ANSWER]") for r in rows]
    assert grade_rows(wrong, rows, "output_prediction", box) == [False] * len(rows)


def test_tiny_code_splits_are_disjoint():
    train, test = (resolve_tiny_dataset("tiny://code", s) for s in ("train", "test"))
    assert len(train) + len(test) == len(PROBLEMS) and len(test) >= 5
    assert not set(train["question"]) & set(test["question"])
    assert {"question", "tests", "completion"} <= set(train.column_names)


@pytest.mark.parametrize("grader,uri", [("code", "tiny://code"), ("output_prediction", "tiny://cruxeval")])
def test_evaluator_pass_at_k_with_known_right_and_wrong_completions(monkeypatch, grader, uri):
    """The evaluator's code path with generation replaced: reference completions score 1, broken ones
    0, and a mix gives the unbiased pass@k of the mix."""
    data = resolve_tiny_dataset(uri, "test")
    data = data.map(lambda row: {"prompt": row["question"]})
    refs = list(data["completion"])
    broken = [r.replace("print(", "print(1 + ") if grader == "code" else r.replace("[/ANSWER]", "0[/ANSWER]")
              for r in refs]

    def fake_generate(model, tokenizer, prompts, *, num_return_sequences=1, do_sample=False, **_):
        index = [refs.index(completion_of[p]) for p in prompts]
        n = num_return_sequences
        texts = [refs[i] if not do_sample or s < n // 2 else broken[i] for i in index for s in range(n)]
        return texts, [[1] for _ in texts]

    completion_of = dict(zip(data["prompt"], refs))
    monkeypatch.setattr(evaluation, "generate", fake_generate)
    cfg = EvalConfig(grader=grader, num_samples=4, pass_k=[1, 2, 4], code_timeout=3)
    report = evaluation.evaluate_model(None, None, data, cfg)
    assert report["greedy_accuracy"] == 1.0
    assert report["sampled_accuracy"] == 0.5 and report["pass@4"] == 1.0
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(1 - 1 / 6)
    assert "vote_accuracy" not in report
    with pytest.raises(ValueError, match="needs column"):
        evaluation.evaluate_model(None, None, data.remove_columns(["tests" if grader == "code" else "output"]), cfg)


def test_one_rlif_step_with_code_accuracy_then_pass_at_k(tmp_path, capsys):
    """configs/rlif/tiny_code.yaml, one step: the reward runs on the policy's programs and the held-out
    problems are evaluated with pass@k (a random tiny model scores ~0; the path is what is tested)."""
    from recipes.common.cli import main
    from recipes.rlif import RLIFRecipeConfig, run

    reports = main("rlif", RLIFRecipeConfig, run, [
        "--config", "configs/rlif/tiny_code.yaml", f"trainer.output_dir={tmp_path}", "trainer.max_steps=1",
        "trainer.max_completion_length=24", "eval.max_new_tokens=24", "eval.num_samples=2", "eval.pass_k=[1,2]",
        "eval.max_rows=3"])
    after = reports["after"]
    assert set(after) >= {"greedy_accuracy", "sampled_accuracy", "pass@1", "pass@2"} and after["rows"] == 3
    assert all(0.0 <= after[k] <= 1.0 for k in ("greedy_accuracy", "pass@1", "pass@2"))
    assert "'rewards/code_accuracy/mean'" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["after"]["pass@2"] == after["pass@2"]


def test_livecodebench_conversion_decodes_hidden_and_call_based_tests():
    import base64
    import pickle
    import zlib

    from recipes.code_data import decode_tests, livecodebench_row

    hidden = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(
        [{"input": "[1, 2]\n3", "output": "[1, 2, 3]", "testtype": "functional"}])))).decode()
    raw = {"question_content": "Append x.", "starter_code": "class Solution:\n    def add(self, xs, x):\n        ",
           "public_test_cases": json.dumps([{"input": "[]\n1", "output": "[1]", "testtype": "functional"}]),
           "private_test_cases": hidden, "metadata": json.dumps({"func_name": "add"}), "question_id": "q1"}
    row = livecodebench_row(raw)
    assert "### Question:\nAppend x." in row["question"] and "starter code" in row["question"]
    right = "class Solution:\n    def add(self, xs, x):\n        return xs + [x]\n"
    wrong = "class Solution:\n    def add(self, xs, x):\n        return [x] + xs\n"
    scores = CodeAccuracy(**SMALL)(prompts=["", ""], completions=[right, wrong], tests=[row["tests"]] * 2)
    assert scores == [1.0, 0.5]
    stdin = livecodebench_row({"question_content": "Echo.", "public_test_cases": '[{"input": "5\\n", "output": "5\\n", '
                               '"testtype": "stdin"}]', "private_test_cases": "[]", "metadata": "{}"})
    assert "stdin" in stdin["question"] and json.loads(stdin["tests"]) == [{"input": "5\n", "output": "5\n"}]
    evil = base64.b64encode(zlib.compress(pickle.dumps(Test(check="x")))).decode()  # a pickled object: refused
    with pytest.raises(pickle.UnpicklingError):
        decode_tests(evil)


def test_cruxeval_config_builds_the_direct_prompt_from_code_and_input(tmp_path):
    from recipes.common.config import load_config
    from recipes.common.data import load_split
    from recipes.evaluate import EvaluateRecipeConfig

    local = tmp_path / "crux.jsonl"
    row = {"code": "def f(x):\n    return x + 1", "input": "3", "output": "4", "id": "s0"}
    local.write_text(json.dumps(row) + "\n")
    cfg = load_config(EvaluateRecipeConfig, "configs/evaluate/qwen2.5-3b_cruxeval.yaml", [f"data.path={local}"])
    data = load_split(cfg.data, cfg.data.eval_split)
    prompt = data[0]["prompt"]
    assert prompt.endswith("[PYTHON]\ndef f(x):\n    return x + 1\nassert f(3) == ??\n[/PYTHON]\n[ANSWER]\n")
    assert prompt.startswith("You are given a Python function") and cfg.eval.grader == "output_prediction"
    assert grade_rows(["assert f(3) == 4\n[/ANSWER]", "assert f(3) == 3\n[/ANSWER]"], [data[0]] * 2,
                      "output_prediction", LocalSandbox(**SMALL)) == [True, False]


def test_evaluate_recipe_rejects_a_code_grader_without_its_column_before_loading(capsys):
    from recipes.common.cli import main
    from recipes.evaluate import EvaluateRecipeConfig, run

    with pytest.raises(SystemExit) as stop:
        main("evaluate", EvaluateRecipeConfig, run, ["--config", "configs/evaluate/tiny_code.yaml",
                                                     "data.path=tiny://arithmetic",
                                                     "model.name_or_path=nobody/never-loaded"])
    assert stop.value.code == 2
    assert "eval.grader" in capsys.readouterr().err
