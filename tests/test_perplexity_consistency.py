"""RPC's perplexity consistency and reasoning pruning against explicit sums over hand-built groups."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rewards import PerplexityConsistency, build_reward
from rewards.perplexity import _weibull_log_pdf, fit_weibull_mixture, prune
from trainers.rlif import whole_group_rewards
from recipes.common.verify import Verifier

# one group: "1/2", "0.5" and "\frac{1}{2}" are one answer; "3" is sampled twice (one path); "no idea" has no answer
GROUP = ["so \\boxed{1/2}", "0.5", "\\boxed{\\frac{1}{2}}", "3", "3", "no idea"]
LOGPS = [[-0.1, -0.3], [-0.2], [-1.0, -2.0, -3.0], [-0.05, -0.15], [-0.05, -0.15], [-0.4]]


def signals(logps):
    return [{"logps": torch.tensor(v)} for v in logps]


def p_mean(v):
    return math.exp(sum(v) / len(v))


def p_seq(v):
    return math.exp(sum(v))


def test_normalized_score_equals_the_explicit_sum():
    p = [p_mean(v) for v in LOGPS]
    half = p[0] + p[1] + p[2]          # three distinct paths to 1/2
    three = p[3]                       # the path "3" counts once
    total = half + three + p[5]        # the unparseable path keeps its mass in the denominator
    got = PerplexityConsistency()(["q"] * 6, GROUP, token_signals=signals(LOGPS))
    assert got == pytest.approx([half / total] * 3 + [three / total] * 2 + [0.0], rel=1e-6)


def test_sequence_probability_and_counting_repeats():
    p = [p_seq(v) for v in LOGPS]
    half, total = p[0] + p[1] + p[2], p[0] + p[1] + p[2] + 2 * p[3] + p[5]
    got = PerplexityConsistency(probability="sequence", unique_paths=False)(["q"] * 6, GROUP, token_signals=signals(LOGPS))
    assert got == pytest.approx([half / total] * 3 + [2 * p[3] / total] * 2 + [0.0], rel=1e-6)


def test_indicator_follows_probability_mass_not_votes():
    # 1/2 has three votes but little mass; 3 one distinct path with more mass than the three together
    logps = [[-3.0], [-3.0], [-3.0], [-0.01], [-0.01], [-0.4]]
    assert 3 * math.exp(-3.0) < math.exp(-0.01)
    got = PerplexityConsistency(score="indicator")(["q"] * 6, GROUP, token_signals=signals(logps))
    assert got == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    # a plain vote (three paths against two) would pick 1/2
    from rewards import MajorityVote
    assert MajorityVote()(["q"] * 6, GROUP) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_groups_are_scored_separately_and_missing_logps_add_no_mass():
    prompts = ["a", "a", "b", "b", "b"]
    completions = ["1", "2", "5", "5.0", "6"]
    logps = [[-1.0], [-2.0], [-0.5], [float("nan")], [-0.1]]
    got = PerplexityConsistency()(prompts, completions, token_signals=signals(logps))
    a = [math.exp(-1.0), math.exp(-2.0)]
    b5, b6 = math.exp(-0.5), math.exp(-0.1)
    assert got == pytest.approx([a[0] / sum(a), a[1] / sum(a), b5 / (b5 + b6), b5 / (b5 + b6), b6 / (b5 + b6)])


def test_quantile_pruning_drops_paths_below_the_quantile():
    completions = ["1", "1.0", "2", "2.0", "2.00"]
    logps = [[-0.1], [-0.2], [-2.0], [-2.1], [-2.2]]
    p = [p_mean(v) for v in logps]
    cut = sorted(p)[2]  # q = 0.5 of five values: the middle one (kept, since the rule drops p < cut)
    kept = [v for v in p if v >= cut]
    assert len(kept) == 3
    got = PerplexityConsistency(pruning={"rule": "quantile", "q": 0.5})(["q"] * 5, completions, token_signals=signals(logps))
    total = p[0] + p[1] + p[2]
    assert got == pytest.approx([(p[0] + p[1]) / total] * 2 + [p[2] / total] * 3)
    # without pruning the low answer keeps all its mass
    plain = PerplexityConsistency()(["q"] * 5, completions, token_signals=signals(logps))
    assert plain[2] == pytest.approx((p[2] + p[3] + p[4]) / sum(p))


def _nll(x, params):
    w, k1, l1, k2, l2 = params
    x = torch.tensor(x, dtype=torch.float64)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return float(-torch.logaddexp(math.log(w) + _weibull_log_pdf(x, t(k1), t(l1)),
                                  math.log(1 - w) + _weibull_log_pdf(x, t(k2), t(l2))).sum())


def test_weibull_fit_is_a_likelihood_maximum_and_prunes_the_low_mode():
    rng = random.Random(0)
    high = [min(0.99, rng.gauss(0.85, 0.04)) for _ in range(12)]
    low = [rng.gauss(0.3, 0.05) for _ in range(6)]
    fit = fit_weibull_mixture(high + low)
    assert fit[2] * math.gamma(1 + 1 / fit[1]) > fit[4] * math.gamma(1 + 1 / fit[3])  # first = high component
    assert _nll(high + low, fit) <= _nll(high + low, [0.5, 1.0, 1.0, 1.5, 2.0]) - 1.0
    assert fit[0] == pytest.approx(12 / 18, abs=0.05)
    assert prune(high + low, {"rule": "weibull"}) == [True] * 12 + [False] * 6
    # the reward: the low paths (distinct answers) lose all their mass
    completions = [f"{i}" for i in range(12)] + [f"{100 + i}" for i in range(6)]
    logps = [[math.log(v)] for v in high + low]
    got = PerplexityConsistency(pruning="weibull", unique_paths=False)(["q"] * 18, completions,
                                                                        token_signals=signals(logps))
    assert got[12:] == [0.0] * 6
    assert got[0] == pytest.approx(high[0] / sum(high), rel=1e-5)


def test_weibull_rule_never_prunes_above_the_mean():
    p = [0.5, 0.52, 0.49, 0.51, 0.9]
    mean = sum(p) / len(p)
    assert all(k for k, v in zip(prune(p, {"rule": "weibull"}), p) if v >= mean)


@pytest.mark.parametrize("kwargs", [{"score": "vote"}, {"probability": "geometric"}, {"pruning": {"rule": "median"}},
                                    {"pruning": {"rule": "quantile", "q": 1.0}}, {"pruning": {"rule": "weibull", "q": 0.1}}])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        PerplexityConsistency(**kwargs)


def test_needs_the_signals_and_the_whole_group():
    reward = build_reward("perplexity_consistency", score="indicator")
    assert whole_group_rewards([reward]) == ["perplexity_consistency"]
    with pytest.raises(RuntimeError, match="internal signals"):
        reward(["q"], ["1"])


def test_as_a_verifier():
    verifier = Verifier([PerplexityConsistency(score="indicator")], [2.0])
    assert verifier.signals == ("logps",) and verifier.internal
    logps = [[-3.0], [-3.0], [-3.0], [-0.01], [-0.01], [-0.4]]
    assert verifier.score(["q"] * 6, GROUP, token_signals=signals(logps)) == [0.0, 0.0, 0.0, 2.0, 2.0, 0.0]


def test_picklable():
    import pickle

    reward = PerplexityConsistency(pruning={"rule": "quantile", "q": 0.3})
    again = pickle.loads(pickle.dumps(reward))
    assert again.pruning == {"rule": "quantile", "q": 0.3} and again.__name__ == "perplexity_consistency"


@pytest.mark.parametrize("p", [[0.9] * 8, [0.9] * 7 + [0.3], [0.99] * 15 + [0.98], [0.999999] * 3 + [0.2] * 5,
                               [1e-30, 0.5, 0.5, 0.5], [0.7, 0.7, 0.71, 0.7, 0.69, 0.7, 0.7, 0.7] * 2])
def test_weibull_pruning_survives_degenerate_groups(p):
    """Repeated paths (common on small models) make the mixture likelihood unbounded: the fit stays
    finite, the best path survives, and nothing at or above the mean is pruned."""
    kept = prune(p, {"rule": "weibull"})
    assert kept[p.index(max(p))]
    mean = math.fsum(p) / len(p)
    assert all(k for k, v in zip(kept, p) if v >= mean)
    if len(set(p)) > 1:
        assert all(math.isfinite(v) for v in fit_weibull_mixture(p))


def test_self_improvement_with_a_perplexity_consistency_verifier(tmp_path, capsys, tiny_cache):
    """The self-improvement recipe (dry run: one small round) reads log-probs for the verifier and keeps samples."""
    from pathlib import Path

    from recipes.common.cli import main
    from recipes.self_improve import SelfImproveRecipeConfig, run

    config = Path(__file__).resolve().parent.parent / "configs" / "self_improve" / "tiny_arithmetic.yaml"
    import recipes.common.verify as verify

    spy = []
    original = verify.Verifier.score

    def score(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        spy.append((self.signals, kwargs.get("token_signals"), out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify.Verifier, "score", score)
        main("self_improve", SelfImproveRecipeConfig, run,
             ["--config", str(config), "--dry-run", f"trainer.output_dir={tmp_path / 'out'}",
              "rewards=[{name: perplexity_consistency, kwargs: {score: indicator}, transform: {scale: 2.0}}]"])
    assert spy, "the verifier never scored"
    signals, token_signals, scores = spy[0]
    assert signals == ("logps",) and token_signals and "logps" in token_signals[0]
    assert set(scores) <= {0.0, 2.0} and 2.0 in scores
