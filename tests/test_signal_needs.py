"""One owner of the internal-signal contract: the names, and what a list of rewards needs."""

from __future__ import annotations

import pytest

import rewards
import trainers.signals
from recipes.common.tiny.models import TinyModelSpec, build_tiny_model
from rewards import InternalConsistency, InternalReward, MathAccuracy, NegativeEntropy, SelfCertainty
from trainers.signals import Needs, signal_needs
from recipes.common.verify import Verifier


def tiny(layers=4):
    return build_tiny_model(TinyModelSpec(layers=layers, hidden=32, heads=2, kv_heads=1, intermediate=64))


def test_the_signal_names_are_defined_once():
    assert trainers.signals.SIGNALS is rewards.SIGNALS


def test_signals_in_contract_order_and_no_lens_without_lens_rewards():
    needs = signal_needs([SelfCertainty(), MathAccuracy(), NegativeEntropy()], tiny())
    assert needs == Needs(signals=("entropy", "self_certainty"), lens_modes=(), lens_layers=None)
    assert signal_needs([MathAccuracy()]) == Needs((), (), None)


def test_lens_layers_are_the_union_of_what_the_rewards_read():
    model = tiny(4)
    funcs = [InternalConsistency(mode="soft"), InternalConsistency(mode="hard", layers=[1])]
    needs = signal_needs(funcs, model)
    assert needs.lens_modes == ("hard", "soft") and needs.signals == ()
    assert needs.lens_layers == [1, 2, 3, 4]  # [1] and the default upper half 2..4
    assert signal_needs(funcs).lens_layers is None  # no model: no depth to take the default from
    assert signal_needs([InternalConsistency(mode="soft", layers=[2, 3])], model).lens_layers == [2, 3]


def test_a_peft_wrapped_model_has_the_same_layers():
    from peft import LoraConfig, get_peft_model

    model = tiny(4)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert signal_needs([InternalConsistency(mode="soft")], wrapped).lens_layers == [2, 3, 4]


def test_a_signal_no_pass_computes_is_refused():
    class Exotic(InternalReward):
        name = "exotic_test_reward"
        abstract = True
        signals = ("attention_entropy",)

        def reduce(self, signals):
            return 0.0

    with pytest.raises(ValueError, match="unknown internal signals \\['attention_entropy'\\]"):
        signal_needs([Exotic()])
    with pytest.raises(ValueError, match="unknown internal signals"):
        Verifier([Exotic()], [1.0])


def test_the_verifier_asks_what_signal_needs_says():
    model = tiny(4)
    funcs = [SelfCertainty(), InternalConsistency(mode="candidates", layers=[2]), MathAccuracy()]
    verifier, needs = Verifier(funcs, [1.0, 1.0, 0.0]), signal_needs(funcs, model)
    assert (verifier.signals, verifier.lens_modes, verifier.lens_layers(model)) == (
        needs.signals, needs.lens_modes, needs.lens_layers) == (("self_certainty",), ("candidates",), [2])
