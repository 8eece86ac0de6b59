"""Answer grading through math-verify: a corpus of equal and different answers, votes, clusters,
gold labels, failures (unparseable, timeouts) and calls off the main thread."""

import logging
import threading

import pytest

from rewards import MajorityVote, MathAccuracy, SemanticCluster, build_reward
from rewards import grading
from rewards.grading import answers_match, clusters, final_answer, final_answers, gold_answer, grade

# (answer, gold, equal): the kinds of pairs hand normalisation gets wrong, and look-alikes that differ
CORPUS = [
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{3}", False),
    ("\\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac{3}{4}", "0.7", False),
    ("x=5", "5", True),
    ("x=5", "6", False),
    ("5", "x=5", True),
    ("y = -3", "-3", True),
    ("1{,}000", "1000", True),
    ("1{,}000", "100", False),
    ("1,000,000", "10^6", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("\\{1,2,3\\}", "\\{1,2\\}", False),
    ("6, -2", "-2, 6", True),
    ("6, -2", "-6, 2", False),
    ("x^2+2x", "2x + x^2", True),
    ("x^2+2x", "x^2 + 2", False),
    ("(x+1)^2", "x^2+2x+1", True),
    ("(x+1)^2", "x^2+1", False),
    ("3\\sqrt{2}", "\\sqrt{18}", True),
    ("3\\sqrt{2}", "\\sqrt{12}", False),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\text{(B)}", "B", True),
    ("\\text{(B)}", "C", False),
    ("\\textbf{(D)}", "D", True),
    ("46.0", "46", True),
    ("46", "47", False),
    ("-46", "46", False),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "0.75", False),
    ("10\\%", "10", True),
    ("12 \\text{ cm}", "12", True),
    ("\\$18", "18", True),
    ("2x", "2", False),
    ("3m^2", "3", False),
    ("\\pi", "3.14159265358979", True),
    ("2\\pi", "\\pi", False),
    ("[1, 2]", "[1,2]", True),
    ("[1, 2]", "(1, 2)", False),
    ("\\infty", "\\infty", True),
    ("\\infty", "-\\infty", False),
    ("\\frac{1}{3}", "0.333", False),
    ("0.333333", "\\frac13", True),  # math-verify rounds to 6 decimals
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
]


@pytest.mark.parametrize("answer, gold, equal", CORPUS)
def test_corpus(answer, gold, equal):
    assert answers_match(answer, gold) is equal
    # a completion that boxes the answer grades the same way
    assert grade(["so the answer is \\boxed{" + answer + "}."], [gold]) == [float(equal)]


def test_corpus_size():
    assert len(CORPUS) >= 40
    assert sum(e for _, _, e in CORPUS) >= 20 and sum(not e for _, _, e in CORPUS) >= 20


@pytest.mark.parametrize("text, answer", [
    ("12+34=46", "46"),
    ("46", "46"),
    ("so \\boxed{\\frac12} and later 7", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}", "1,2"),  # math-verify reads every box (boxed="all"), as TRL does
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("3\\sqrt{2}", "3\\sqrt{2}"),  # a bare LaTeX answer is read whole, not as its leading 3
    ("\\text{(B)}", "\\text{(B)}"),
    ("no idea", None),
    ("", None),
    ("\\boxed{}", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_gold_labels():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gold_answer("We find $x$... so the answer is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert gold_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert answers_match("1/2", "Solving, we get $\\boxed{\\dfrac12}$.")
    assert answers_match("72", "blah\n#### 72") and not answers_match("72", "#### 1,072")


def test_vote_over_spellings_rewards_the_four():
    completions = ["\\frac12", "0.5", "1/2", "\\dfrac{1}{2}", "3", "3"]
    assert MajorityVote()(prompts=["q"] * 6, completions=completions) == [1.0] * 4 + [0.0] * 2
    boxed = ["so \\boxed{" + c + "}" for c in completions]
    assert MajorityVote()(prompts=["q"] * 6, completions=boxed) == [1.0] * 4 + [0.0] * 2
    assert clusters(completions) == [0, 0, 0, 0, 1, 1]


def test_unparseable_answers_never_match_and_never_win():
    # four unparseable answers outnumber the two 7s; they still do not win (and get no reward)
    completions = ["???", "no idea", "", "\\boxed{}", "7", "so 7"]
    assert MajorityVote()(prompts=["q"] * 6, completions=completions) == [0.0] * 4 + [1.0] * 2
    assert clusters([None, "\\frac{", "7"]) == [None, None, 0]
    assert not answers_match(None, "7") and not answers_match("\\frac{", "\\frac{")
    assert not answers_match("?? }{", "?? }{")  # equal strings that do not parse: no match


def test_unparseable_gold_is_a_logged_skip(caplog):
    with caplog.at_level(logging.WARNING, logger="rewards.grading"):
        out = MathAccuracy()(prompts=["q"] * 2, completions=["7", "\\boxed{7}"], answer=["\\frac{ }{", "7"])
    assert out == [None, 1.0]
    assert "does not parse" in caplog.text


def test_semantic_cluster_reward_against_counts():
    prompts = ["a"] * 5 + ["b"] * 3
    completions = ["\\frac12", "0.5", "3", "x=3", "???",    # a: {1/2: 2, 3: 2, unparseable}
                   "1", "2", "nothing"]                    # b: every answer alone -> 0 throughout
    reward = build_reward("semantic_cluster")
    assert reward(prompts=prompts, completions=completions) == [0.4, 0.4, 0.4, 0.4, 0.0, 0.0, 0.0, 0.0]
    assert SemanticCluster(zero_when_all_distinct=False)(prompts=prompts, completions=completions)[5:] == [
        1 / 3, 1 / 3, 0.0]


def test_a_timeout_scores_zero_and_is_logged(monkeypatch, caplog):
    grading.clear_caches()
    monkeypatch.setattr(grading, "TIMEOUT_S", 0.05)

    def slow(*args, **kwargs):
        import time

        time.sleep(5)
        return True

    monkeypatch.setattr("math_verify.verify", slow)
    before = grading.SKIPPED["timeout"]
    with caplog.at_level(logging.WARNING, logger="rewards.grading"):
        assert answers_match("\\frac{1}{2}", "0.5000001") is False  # needs sympy's verify, which hangs
    assert grading.SKIPPED["timeout"] == before + 1 and "ran past" in caplog.text
    assert answers_match("7", "7") is True  # structurally equal: no verify call


def test_outer_timer_survives_grading():
    import signal

    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        grade(["\\boxed{x^2+2x}"], ["2x+x^2"])
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < left <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_off_the_main_thread_gives_the_same_answers():
    """TRL or a user may call a reward from a thread: math-verify's signal timeouts would raise
    there; grading hands the call to its worker process instead."""
    completions = ["\\frac12", "0.5", "1/2", "\\dfrac{1}{2}", "3", "3"]
    results = {}

    def work():
        results["vote"] = MajorityVote()(prompts=["q"] * 6, completions=completions)
        results["grade"] = grade(["\\boxed{3\\sqrt{2}}", "7"], ["\\sqrt{18}", "8"])
        results["answers"] = final_answers(["so \\boxed{\\frac12}", "no idea"])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert results == {"vote": [1.0] * 4 + [0.0] * 2, "grade": [1.0, 0.0], "answers": ["\\frac{1}{2}", None]}


def test_fast_paths_agree_with_math_verify():
    """Structural equality and the rational shortcut give what math-verify's ``verify`` gives."""
    import random

    import sympy
    from math_verify import verify

    rng = random.Random(0)
    pairs = [(sympy.Rational(rng.randint(-20, 20), rng.randint(1, 6)), sympy.Rational(rng.randint(-20, 20), rng.randint(1, 6)))
             for _ in range(40)]
    pairs += [(sympy.Integer(n), sympy.Integer(n)) for n in (0, 7, -3)] + [(sympy.Rational(1, 2), sympy.Rational(2, 4))]
    assert any(a == b for a, b in pairs) and any(a != b for a, b in pairs)
    for a, b in pairs:
        assert grading._equal(a, b) is bool(verify(a, b, timeout_seconds=None)), (a, b)
