"""RLIFTrainer: signals of the current policy in one no-grad pass, exact against full-softmax references."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import GRPOTrainer

from rewards import InternalReward, MathAccuracy, SelfCertainty
from trainers import RLIFConfig, RLIFTrainer

PROMPTS = ["12+34=", "7+5=", "99+1=", "3+4="]


class Probe(InternalReward):
    """Records what it is given; reward = mean log-prob, or NaN for completions listed in ``nan_rows``."""

    signals = ("logps", "entropy", "self_certainty")

    def __init__(self, nan_rows=()):
        self.seen, self.nan_rows = [], set(nan_rows)

    def __call__(self, prompts, completions, token_signals=None, **kw):
        self.seen.append(token_signals)
        return super().__call__(prompts, completions, token_signals=token_signals, **kw)

    def reduce(self, signals):
        return float(signals["logps"].mean())


class WrongCount(InternalReward):
    signals = ("entropy",)

    def __call__(self, prompts, completions, **kw):
        return [0.0]


def make_trainer(model_dir, tmp_path, rewards, trainer_cls=RLIFTrainer, peft=None, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=6, temperature=0.7, learning_rate=1e-3, bf16=False, use_cpu=True,
                   gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=0)
    options.update(overrides)
    args = RLIFConfig(**options)
    data = Dataset.from_dict({"prompt": PROMPTS * 8, "answer": ["46", "12", "100", "7"] * 8})
    return trainer_cls(model=model_dir, reward_funcs=rewards, args=args, train_dataset=data,
                       processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft)


def batch(trainer, prompts):
    """Generate like TRL does and return the padded (ids, mask, completion length) it scores."""
    prompt_ids, completion_ids = trainer._generate(prompts)[:2]
    pad_id = trainer._tokenizer.pad_token_id
    p = max(map(len, prompt_ids))
    c = max(map(len, completion_ids))
    ids = torch.tensor([[pad_id] * (p - len(a)) + a + b + [pad_id] * (c - len(b)) for a, b in zip(prompt_ids, completion_ids)])
    mask = torch.tensor([[0] * (p - len(a)) + [1] * (len(a) + len(b)) + [0] * (c - len(b)) for a, b in zip(prompt_ids, completion_ids)])
    return prompt_ids, completion_ids, ids, mask, c


def naive_signals(model, ids, mask, c, temperature):
    """Full (B, L, V) logits -> per-token signals of the completion positions (the reference)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1].double() / temperature
    logp = logits.log_softmax(-1)
    targets = ids[:, -c:]
    return {
        "logps": logp.gather(-1, targets[..., None])[..., 0],
        "entropy": -(logp.exp() * logp).sum(-1),
        "self_certainty": torch.logsumexp(logits, -1) - logits.mean(-1) - math.log(logits.shape[-1]),
    }


def check_against_naive(trainer, model):
    prompt_ids, completion_ids, ids, mask, c = batch(trainer, [p for p in PROMPTS for _ in range(2)])
    trainer._batch.signals = None  # drop what generation captured (tests/test_generation_capture.py): the extra pass
    trainer._policy_pass(completion_ids)
    ours = trainer._batch.signals
    ref = naive_signals(model, ids, mask, c, trainer.temperature)
    cmask = mask[:, -c:].bool()
    for name in ("logps", "entropy", "self_certainty"):
        torch.testing.assert_close(ours[name][cmask].double(), ref[name][cmask], rtol=1e-4, atol=1e-4, msg=name)
    assert (ours["self_certainty"][cmask] >= -1e-5).all()
    # aligned exactly like TRL's own per-token log-probs (the ones the loss uses)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, mask, c, batch_size=4, compute_entropy=True)
    torch.testing.assert_close(ours["logps"][cmask], trl_logps[cmask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["entropy"][cmask], trl_entropy[cmask], rtol=1e-4, atol=1e-4)
    return completion_ids, ours, cmask


def test_signals_match_full_softmax_and_trl_logps(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, [SelfCertainty()])
    completion_ids, ours, cmask = check_against_naive(trainer, trainer.model)
    # padding: the mask is exactly the generated tokens, EOS included when emitted
    eos = trainer._tokenizer.eos_token_id
    assert cmask.sum(1).tolist() == [len(c) for c in completion_ids]
    assert any(c[-1] == eos for c in completion_ids) or all(len(c) == 6 for c in completion_ids)


def test_signals_come_from_the_adapted_policy(tiny_model_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    trainer = make_trainer(tiny_model_dir, tmp_path, [SelfCertainty()], peft=lora, beta=0.1)
    check_against_naive(trainer, trainer.model)  # the PEFT model, adapters on
    prompt_ids, completion_ids, ids, mask, c = batch(trainer, PROMPTS)
    generated = trainer._batch.signals  # captured during generation (adapters on); now the extra pass's turn
    trainer._batch.signals = None
    # TRL's reference pass on a PEFT model (adapters disabled) must not be mistaken for the policy
    with torch.no_grad(), trainer.model.disable_adapter():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, c, batch_size=4)
    assert trainer._batch.signals is None
    trainer._policy_pass(completion_ids)
    with trainer.model.disable_adapter():
        base = naive_signals(trainer.model, ids, mask, c, trainer.temperature)
    cmask = mask[:, -c:].bool()
    assert not torch.allclose(trainer._batch.signals["self_certainty"][cmask].double(), base["self_certainty"][cmask], atol=1e-3)
    torch.testing.assert_close(generated["self_certainty"][cmask], trainer._batch.signals["self_certainty"][cmask],
                               rtol=1e-5, atol=1e-5)


def count_scoring_passes(trainer):
    """Count no-grad fused-head forwards (TRL's scoring passes) of the policy."""
    calls = []

    def hook(module, args, kwargs):
        if kwargs.get("fused_lm_head") and not torch.is_grad_enabled():
            calls.append(1)

    handle = trainer.accelerator.unwrap_model(trainer.model).register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("num_iterations, capture_mib, extra", [(2, None, 0), (1, None, 0), (1, "0", 1)])
def test_one_pass_rides_on_trl_old_logps(tiny_model_dir, tmp_path, monkeypatch, num_iterations, capture_mib, extra):
    """With TRL's old-logps pass (num_iterations=2) no forward is added; without it the signals come from
    generation's forwards, or (capture off) from one extra pass."""
    if capture_mib is not None:
        monkeypatch.setenv("INTRINSIC_GENERATION_CAPTURE_MIB", capture_mib)
    counts = {}
    for cls in (GRPOTrainer, RLIFTrainer):
        rewards = [Probe(), MathAccuracy()] if cls is RLIFTrainer else [MathAccuracy()]
        trainer = make_trainer(tiny_model_dir, tmp_path, rewards, trainer_cls=cls, num_iterations=num_iterations,
                               per_device_train_batch_size=4, steps_per_generation=2, gradient_accumulation_steps=2)
        trainer.model.train()  # as in training: micro-batches of per_device_train_batch_size
        calls, handle = count_scoring_passes(trainer)
        inputs = [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(2)]
        torch.manual_seed(0)
        out = trainer._generate_and_score_completions(inputs)
        handle.remove()
        counts[cls] = len(calls)
        if cls is RLIFTrainer:
            seen = rewards[0].seen[-1]
            assert len(seen) == 8 and all(s["logps"].shape == s["entropy"].shape for s in seen)
            if num_iterations > 1:  # the signals' log-probs are the very old log-probs TRL stored
                old = out["old_per_token_logps"]
                for i, s in enumerate(seen):
                    torch.testing.assert_close(s["logps"], old[i, : len(s["logps"])], rtol=1e-5, atol=1e-5)
    micro_batches = 8 // 4
    assert counts[RLIFTrainer] == counts[GRPOTrainer] + extra * micro_batches, counts


def test_nan_signal_is_skipped_not_propagated(tiny_model_dir, tmp_path, caplog):
    class NanOnSecond(InternalReward):
        """Mean log-prob, with a NaN signal injected into the second completion."""

        signals = ("logps",)

        def __call__(self, prompts, completions, token_signals=None, **kw):
            token_signals = [dict(s) for s in token_signals]
            token_signals[1]["logps"] = torch.full_like(token_signals[1]["logps"], float("nan"))
            return super().__call__(prompts, completions, token_signals=token_signals, **kw)

        def reduce(self, signals):
            return float(signals["logps"].mean())

    trainer = make_trainer(tiny_model_dir, tmp_path, [NanOnSecond(), MathAccuracy()], reward_weights=[1.0, 0.0])
    trainer.model.train()
    inputs = [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(2)]
    with caplog.at_level("WARNING", logger="intrinsic"):
        out = trainer._generate_and_score_completions(inputs)
    adv = out["advantages"]
    assert torch.isfinite(adv).all()
    assert adv[1] == 0  # the NaN completion: advantage 0, not "reward 0" (accuracy has weight 0)
    assert "no finite value" in caplog.text and "left out of their group" in caplog.text
    assert trainer._metrics["train"]["signals/skipped"][-1] == 1.0


def test_wrong_reward_count_fails_clearly(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, [WrongCount()])
    with pytest.raises(ValueError, match="'wrong_count' returned 1 rewards, but 8 were expected"):
        trainer._generate_and_score_completions([{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(2)])


def test_internal_reward_outside_rlif_trainer_says_why():
    with pytest.raises(RuntimeError, match="RLIFTrainer"):
        SelfCertainty()(prompts=["p"], completions=["c"])


@pytest.mark.parametrize("options", [dict(beta=0.05), dict(gradient_accumulation_steps=2, num_iterations=2)])
def test_short_training_run_changes_weights_and_logs(tiny_model_dir, tmp_path, options):
    trainer = make_trainer(tiny_model_dir, tmp_path, [SelfCertainty(), MathAccuracy()], max_steps=2,
                           reward_weights=[1.0, 0.0], **options)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    scored = [h for h in logs if "rewards/self_certainty/mean" in h]  # steps that generated (and scored)
    assert scored
    for key in ("signals/self_certainty/mean", "signals/entropy/mean", "rewards/self_certainty/std",
                "rewards/math_accuracy/mean", "completions/mean_length", "entropy"):
        assert all(key in h and math.isfinite(h[key]) for h in scored), key
    for h in scored:
        assert h["signals/self_certainty/mean"] == pytest.approx(h["rewards/self_certainty/mean"], rel=1e-5)
    if options.get("beta"):
        assert all("kl" in h for h in logs)
