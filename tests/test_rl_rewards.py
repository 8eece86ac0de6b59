"""Label-free and format rewards: group majority vote (ties, unparseable answers), entropy tails."""

import math
import pickle

import pytest
import torch

from rewards import Format, MajorityVote, NegativeEntropy, SelfCertainty, plurality


def test_majority_vote_per_group():
    prompts = ["a"] * 4 + ["b"] * 4
    completions = ["12", "12.0", "13", "x",          # group a: "12" wins 2-1
                   "no", "answer", "here", "7"]      # group b: only "7" parses, so it wins alone
    assert MajorityVote()(prompts=prompts, completions=completions) == [1, 1, 0, 0, 0, 0, 0, 1]


def test_majority_vote_ties_and_empty_groups():
    # a 2-2 tie goes to the answer seen first in the group; a group with nothing parseable scores 0
    assert MajorityVote()(prompts=["q"] * 4, completions=["5", "6", "6", "5"]) == [1.0, 0.0, 0.0, 1.0]
    assert MajorityVote()(prompts=["q"] * 3, completions=["?", "!", ""]) == [0.0, 0.0, 0.0]
    assert plurality([None, None, "3"]) == "3"  # None never wins, however many
    # boxed and plain forms of the same number vote together; a boxed answer beats a stray number
    assert MajorityVote()(prompts=["q"] * 3, completions=["\\boxed{4}", "so 4", "3 then \\boxed{5}"]) == [1, 1, 0]


def test_majority_vote_uses_chat_completions_and_pickles():
    chat = [[{"role": "assistant", "content": c}] for c in ["1", "1", "2"]]
    reward = pickle.loads(pickle.dumps(MajorityVote()))
    assert reward(prompts=[[{"role": "user", "content": "q"}]] * 3, completions=chat) == [1.0, 1.0, 0.0]


def test_negative_entropy_tails():
    h = {"entropy": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    call = lambda r: r(prompts=["p"], completions=["c"], token_signals=[h])[0]  # noqa: E731
    assert call(NegativeEntropy()) == pytest.approx(-2.5)
    assert call(NegativeEntropy(last_k=1)) == pytest.approx(-1.0)
    assert call(NegativeEntropy(last_k=10)) == pytest.approx(-2.5)
    assert call(NegativeEntropy(last_fraction=0.5)) == pytest.approx(-1.5)
    assert call(NegativeEntropy(last_fraction=0.1)) == pytest.approx(-1.0)  # at least one token
    with pytest.raises(ValueError, match="not both"):
        NegativeEntropy(last_k=1, last_fraction=0.5)
    with pytest.raises(ValueError, match="last_k"):
        NegativeEntropy(last_k=0)
    with pytest.raises(ValueError, match="last_fraction"):
        NegativeEntropy(last_fraction=0.0)


def test_negative_entropy_rent_format_penalty():
    """rent-rl: all response tokens; no closed \\boxed{} answer -> scored as entropy 7.0, whatever its entropy."""
    low, high = {"entropy": torch.tensor([0.5, 0.5])}, {"entropy": torch.tensor([9.0, 11.0])}
    texts = ["so \\boxed{12}.", "so 12", "\\boxed{1", "\\boxed{\\frac{1}{2}} then \\boxed 7", "\\fbox{x}", "no box"]
    signals = [low, low, low, low, high, high]
    rent = NegativeEntropy(unparseable_entropy=7.0)
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    expected = [-0.5, -7.0, -7.0, -0.5, -10.0, -7.0]
    assert rent(prompts=["p"] * 6, completions=texts, token_signals=signals) == pytest.approx(expected)
    assert rent(prompts=["p"] * 6, completions=chat, token_signals=signals) == pytest.approx(expected)
    plain = NegativeEntropy()(prompts=["p"] * 6, completions=texts, token_signals=signals)
    assert plain == pytest.approx([-0.5] * 4 + [-10.0] * 2)  # no penalty unless asked
    assert pickle.loads(pickle.dumps(rent)).unparseable_entropy == 7.0
    with pytest.raises(ValueError, match="finite"):
        NegativeEntropy(unparseable_entropy=float("nan"))


@pytest.mark.parametrize("n, fraction, kept", [(7, 0.5, 4), (3, 0.5, 2), (7, 1.0, 7), (7, 0.01, 1), (3, 0.01, 1),
                                               (25, 0.28, 7)])  # 0.28 * 25 = 7.000000000000001 keeps 7, not 8
def test_negative_entropy_last_fraction_counts(n, fraction, kept):
    """ceil(fraction * n) tokens, at least one for a non-empty completion."""
    entropy = torch.arange(n, dtype=torch.float32)
    got = NegativeEntropy(last_fraction=fraction)(["p"], ["c"], token_signals=[{"entropy": entropy}])[0]
    assert got == pytest.approx(-float(entropy[n - kept :].mean()))


def test_internal_rewards_skip_empty_and_nan():
    signals = [{"self_certainty": torch.tensor([])}, {"self_certainty": torch.tensor([1.0, math.nan])},
               {"self_certainty": torch.tensor([2.0, 4.0])}]
    assert SelfCertainty()(prompts=["p"] * 3, completions=["c"] * 3, token_signals=signals) == [None, None, 3.0]


def test_format_reward():
    assert Format()(prompts=["q"] * 3, completions=["x \\boxed{\\frac{1}{2}}.", "\\boxed{1} more", "1"]) == [1, 0, 0]
    assert pickle.loads(pickle.dumps(Format(pattern=r"\d+")))(prompts=["q"], completions=["42"]) == [1.0]
