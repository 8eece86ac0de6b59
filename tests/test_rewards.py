"""Reward registry, dotted paths, picklability, answer extraction and comparison."""

import pickle

import pytest

from rewards import REGISTRY, MathAccuracy, Reward, UnknownRewardError, build_reward, get_reward_class
from rewards.answers import extract_answer, find_answer, normalize_answer
from rewards.grading import answers_match


class ShortAnswer(Reward):
    """Defined in a test module: registered by subclassing, reachable by dotted path too."""

    def __init__(self, limit: int = 2):
        self.limit = limit

    def score(self, completion, **row):
        return float(len(completion) <= self.limit)


def test_subclass_registers_and_dotted_path_resolves():
    assert REGISTRY["short_answer"] is ShortAnswer
    assert get_reward_class("tests.test_rewards.ShortAnswer") is ShortAnswer
    reward = build_reward("short_answer", limit=1)
    assert reward.__name__ == "short_answer"
    assert reward(prompts=["p", "p"], completions=["7", "77"]) == [1.0, 0.0]
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.limit == 1 and clone.__name__ == "short_answer"


def test_unknown_reward_suggests():
    with pytest.raises(UnknownRewardError, match="closest: 'short_answer'"):
        get_reward_class("short_answr")
    with pytest.raises(UnknownRewardError, match="cannot import"):
        get_reward_class("nope.Missing")


def test_math_accuracy_reads_columns_and_chat_completions():
    reward = MathAccuracy()
    completions = ["46", [{"role": "assistant", "content": "so \\boxed{46}"}], "45", "no idea"]
    assert reward(prompts=[""] * 4, completions=completions, answer=["46"] * 4) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="'answer' column"):
        reward(prompts=[""], completions=["1"])


@pytest.mark.parametrize(
    "text, answer",
    [
        ("46", "46"),
        ("The sum is 12, so 12+34 = 46.", "46"),
        ("\\boxed{\\frac{1}{2}} and later 7", "\\frac{1}{2}"),
        ("\\boxed{x^{2}+1}", "x^{2}+1"),
        ("-3.5", "-3.5"),
        ("nothing here", None),
        ("\\boxed{12", "12"),  # unclosed box: fall back to the last number
        ("\\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),  # nested braces inside the box
        ("first \\boxed{1}, then \\boxed{\\boxed{2}}", "2"),  # the innermost of the last boxes
        ("It costs $1,250.", "1,250"),
        ("The temperature fell to -12 degrees", "-12"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_find_answer_span_points_at_the_answer():
    text = "12+34=46 done"
    found = find_answer(text)
    assert text[found.start : found.end] == "46"


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("46", "46.0", True),
        ("1,000", "1000", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{2}{4}", "1/2", True),
        ("$7$", "7", True),
        ("10\\%", "10", True),
        ("46", "47", False),
        ("-46", "46", False),
        ("x + 1", "x+1", True),
        (None, "1", False),
        ("1", "\\boxed{1}", True),  # a gold solution with a box gives its box
        ("72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", True),  # GSM8K gold
        ("72", "#### 1,072", False),
        ("1,250", "1250", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("\\frac{-3}{4}", "-0.75", True),
        ("12 cm", "12", True),  # trailing units
        ("5\\text{ apples}", "5", True),
        ("\\$18", "18", True),
        ("3m^2", "3", False),  # one letter is a variable, not a unit
        ("2x", "2", False),
        ("-7", "-7.0", True),
    ],
)
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


def test_normalize_is_idempotent():
    for s in ["0.50", "\\frac{3}{6}", "1,234", "\\text{ cm}"]:
        assert normalize_answer(normalize_answer(s)) == normalize_answer(s)
