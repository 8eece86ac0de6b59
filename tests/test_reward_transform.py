"""Reward transforms (IRRL's clipped linear form, group rank) against explicit values, and their plumbing."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from rewards import InternalReward, MajorityVote, SelfCertainty, TransformedReward, with_transform
from rewards.transform import check_transform, group_ranks
from trainers.rlif import whole_group_rewards
from recipes.common.verify import Verifier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Fixed:
    """A reward returning given values (None / NaN included)."""

    __name__ = "fixed"

    def __init__(self, values):
        self.values = values

    def __call__(self, prompts, completions, **columns):
        return list(self.values)


def test_clipped_linear_equals_explicit_values():
    values = [0.05, 0.1, 0.35, 0.9, None, float("nan"), -2.0]
    reward = with_transform(Fixed(values), {"clip": [0.0, 0.5], "scale": 2.0, "shift": -0.2})
    got = reward(["q"] * 7, ["c"] * 7)
    # 2*0.05-0.2 < 0 -> 0; 2*0.1-0.2 = 0; 2*0.35-0.2 = 0.5; 2*0.9-0.2 = 1.6 -> 0.5; 2*(-2)-0.2 -> 0
    assert got[:4] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert got[4] is None and math.isnan(got[5]) and got[6] == 0.0


def test_irrl_form_and_one_sided_clip():
    # IRRL: max(0, q - 1/|Y|) with |Y| = 10
    q = [0.02, 0.1, 0.55, 1.0]
    got = with_transform(Fixed(q), {"clip": [0, None], "shift": -0.1})(["q"] * 4, ["c"] * 4)
    assert got == pytest.approx([max(0.0, v - 0.1) for v in q])
    # only scale/shift: a plain affine map, nothing clipped
    got = with_transform(Fixed([-3.0, 4.0]), {"scale": 0.5, "shift": 1.0})(["q"] * 2, ["c"] * 2)
    assert got == [-0.5, 3.0]
    got = with_transform(Fixed([-3.0, 4.0]), {"clip": [None, 1.0]})(["q"] * 2, ["c"] * 2)
    assert got == [-3.0, 1.0]


def test_rank_within_groups_ties_and_missing_values():
    prompts = ["a"] * 5 + ["b"] * 3 + ["c"]
    values = [0.7, 0.1, 0.7, None, 0.4, 9.0, float("nan"), -1.0, 3.0]
    got = with_transform(Fixed(values), "rank")(prompts, ["x"] * 9)
    # group a: finite 0.1 < 0.4 < 0.7 = 0.7 -> 0-based ranks 0, 1, 2.5 (ties: mean), over n - 1 = 3
    assert got[0] == pytest.approx(2.5 / 3) and got[1] == 0.0 and got[2] == pytest.approx(2.5 / 3)
    assert got[3] is None and got[4] == pytest.approx(1 / 3)
    assert got[5] == 1.0 and math.isnan(got[6]) and got[7] == 0.0  # group b: two finite values
    assert got[8] == 0.5                                            # a group of one
    assert group_ranks(["a"] * 3, [2.0, 2.0, 2.0]) == [0.5, 0.5, 0.5]


def test_wrapper_keeps_name_forwards_group_and_signals_and_pickles():
    vote = with_transform(MajorityVote(), {"scale": 2.0})
    assert vote.__name__ == "majority_vote" and vote.needs_whole_group
    assert whole_group_rewards([vote]) == ["majority_vote"]
    ranked = with_transform(SelfCertainty(), "rank")
    assert isinstance(ranked, InternalReward) and ranked.signals == ("self_certainty",)
    assert ranked.__name__ == "self_certainty" and ranked.needs_whole_group  # rank reads the whole group
    plain = with_transform(SelfCertainty(), {"shift": 1.0})
    assert not plain.needs_whole_group and whole_group_rewards([plain]) == []
    again = pickle.loads(pickle.dumps(plain))
    assert isinstance(again, TransformedReward) and again.transform == plain.transform
    sc = [{"self_certainty": torch.tensor([1.0, 3.0])}]
    assert again(["p"], ["c"], token_signals=sc) == [3.0]
    assert with_transform(MajorityVote(), None).__class__ is MajorityVote
    assert "transformed_reward" not in __import__("rewards").REGISTRY


def test_verifier_reads_a_transformed_internal_reward():
    verifier = Verifier([with_transform(SelfCertainty(), {"clip": [0, 2]})], [1.0])
    assert verifier.signals == ("self_certainty",)
    sc = [{"self_certainty": torch.tensor([1.0, 5.0])}, {"self_certainty": torch.tensor([0.5])}]
    assert verifier.score(["p", "p"], ["a", "b"], token_signals=sc) == [2.0, 0.5]


def test_self_improve_verifier_gets_the_transform():
    from recipes.common.schema import RewardSpec
    from recipes.common.rounds import build_verifier

    verifier = build_verifier([RewardSpec("majority_vote", 1.0, {}, {"scale": 3.0, "shift": -1.0})], "x.yaml")
    assert verifier.score(["q"] * 3, ["7", "7", "8"]) == [2.0, 2.0, -1.0]


@pytest.mark.parametrize("bad", [{"clip": [1, 0]}, {"clip": [0]}, {"clip": ["a", 1]}, {"scale": True},
                                 {"shift": float("inf")}, {"offset": 1}, "ranks", 3])
def test_bad_transforms_raise(bad):
    with pytest.raises(ValueError):
        check_transform(bad)


def test_a_config_with_a_transform_dry_runs(tmp_path, capsys, tiny_cache):
    from recipes.common.cli import main
    from recipes.rlif import RLIFRecipeConfig, run

    config = tmp_path / "c.yaml"
    config.write_text(f"base: [{CONFIGS / 'rlif' / 'tiny_arithmetic_rpc.yaml'}]\n"
                      "rewards:\n"
                      "  - {name: perplexity_consistency, kwargs: {score: indicator}, transform: {clip: [0, 1], shift: -0.5}}\n"
                      "  - {name: self_certainty, weight: 0.1, transform: rank}\n"
                      f"trainer: {{output_dir: '{tmp_path / 'out'}'}}\n")
    main("rlif", RLIFRecipeConfig, run, ["--config", str(config), "--dry-run"])
    assert f"dry run of {config}" in capsys.readouterr().out

