"""Signals read from HF generation's own forwards == signals of RLIF's extra no-grad pass.

The route (trainers/rlif.py ``signal_route``): with HF generation and no TRL policy pass before
the rewards, the final and lens-layer states of every decoding step are kept and projected after
generation; the extra pass stays as the fallback. Per token, the two must agree up to the
floating-point difference between the KV-cache path and a full forward.
"""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from rewards import InternalReward
from trainers import RLIFConfig, RLIFTrainer
from trainers.generation_capture import StepStates, capture_bytes, step_mask

PROMPTS = ["12+34=", "7+5=", "99+1=", "3+4="]  # 4 lengths: left padding
PER_TOKEN = ("logps", "entropy", "self_certainty")
LENS = ("ic_hard", "ic_soft", "ic_candidates", "ic_calibrated")


class CaptureProbe(InternalReward):
    """Records every ``token_signals`` list it is given."""

    signals = PER_TOKEN + LENS

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, completions, token_signals=None, **kw):
        self.seen.append(token_signals)
        return [0.0] * len(completions)


def make_trainer(model_dir, tmp_path, rewards, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=12, temperature=0.7, learning_rate=1e-3, bf16=False, use_cpu=True,
                   gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                   log_signals=True)
    options.update(overrides)
    data = Dataset.from_dict({"prompt": PROMPTS * 8, "answer": ["46", "12", "100", "7"] * 8})
    return RLIFTrainer(model=model_dir, reward_funcs=rewards, args=RLIFConfig(**options), train_dataset=data,
                       processing_class=AutoTokenizer.from_pretrained(model_dir))


def stop_early(trainer, logit=1.5):
    """A head bias that makes EOS likely: rows stop at different steps (and the bias path is exercised)."""
    head = trainer._policy.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[trainer._tokenizer.eos_token_id] = logit
    head.bias = torch.nn.Parameter(bias)


def score(trainer, prompts, completion_ids):
    inputs = [{"prompt": p, "answer": "0"} for p in prompts]
    texts = trainer._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    trainer._calculate_rewards(inputs, prompts, texts, completion_ids)


def both_routes(trainer, probe, prompts):
    """Signals as rewards see them: from generation, then from the extra pass over the same completions."""
    torch.manual_seed(0)
    prompt_ids, completion_ids = trainer._generate(prompts)[:2]
    assert trainer._batch.signals is not None  # captured: no pass needed
    passes = []
    original = trainer._policy_pass
    trainer._policy_pass = lambda ids: (passes.append(1), original(ids))
    score(trainer, prompts, completion_ids)
    assert not passes
    trainer._batch.signals, trainer._batch.lens_states = None, None  # forget them: the fallback recomputes
    score(trainer, prompts, completion_ids)
    assert passes == [1]
    return completion_ids, probe.seen[-2], probe.seen[-1]


def test_generation_signals_equal_the_extra_pass(tiny_model_dir, tmp_path):
    probe = CaptureProbe()
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe])
    assert trainer.signal_route()[0] == "generation"
    stop_early(trainer)
    prompts = [p for p in PROMPTS for _ in range(3)]
    completion_ids, generated, extra = both_routes(trainer, probe, prompts)
    lengths = [len(c) for c in completion_ids]
    eos = trainer._tokenizer.eos_token_id
    assert min(lengths) < max(lengths) == 12 and any(c[-1] == eos for c in completion_ids)  # early stops, padding
    for i, (g, e) in enumerate(zip(generated, extra)):
        for name in PER_TOKEN:
            assert g[name].shape == (lengths[i],)
            torch.testing.assert_close(g[name], e[name], rtol=1e-5, atol=1e-5, msg=f"{name}, row {i}")
        for name in LENS:
            torch.testing.assert_close(g[name], e[name], rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{name}, row {i}")
        assert g["ic_layers"] == e["ic_layers"] and g["ic_answer_found"] == e["ic_answer_found"]
    assert sum(g["ic_soft"].numel() for g in generated) > 0


def test_generation_signals_without_lens_and_eval_batch(tiny_model_dir, tmp_path):
    """Signals only (no lens hooks), in eval mode (another batch size): the same per-token values."""

    class CaptureSelfCertaintyProbe(CaptureProbe):
        signals = ("self_certainty",)

    probe = CaptureSelfCertaintyProbe()
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe], max_completion_length=8)
    assert trainer._lens is None
    stop_early(trainer, logit=2.0)
    trainer.model.eval()
    completion_ids, generated, extra = both_routes(trainer, probe, PROMPTS + PROMPTS[:1])
    for g, e in zip(generated, extra):
        for name in PER_TOKEN:
            torch.testing.assert_close(g[name], e[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, route", [
    (dict(num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4, steps_per_generation=2),
     "riding"),
    (dict(vote_samples=8, log_signals=True), "extra_pass"),
])
def test_route_is_chosen_and_logged(tiny_model_dir, tmp_path, caplog, options, route):
    class CaptureEntropyReward(InternalReward):
        signals = ("entropy",)

        def reduce(self, signals):
            return float(signals["entropy"].mean())

    from rewards import MajorityVote

    rewards = [MajorityVote()] if "vote_samples" in options else [CaptureEntropyReward()]
    with caplog.at_level(logging.INFO, logger="intrinsic"):
        trainer = make_trainer(tiny_model_dir, tmp_path, rewards, **options)
    assert trainer.signal_route()[0] == route
    assert sum("RLIF internal signals: " + route in r.getMessage() for r in caplog.records) == 1
    prompt_ids, completion_ids = trainer._generate(PROMPTS * 2)[:2]
    assert trainer._batch.signals is None  # nothing captured: TRL's pass or our extra pass computes them


def test_capture_off_and_over_budget_fall_back_to_the_extra_pass(tiny_model_dir, tmp_path, monkeypatch, caplog):
    probe = CaptureProbe()
    monkeypatch.setenv("INTRINSIC_GENERATION_CAPTURE_MIB", "0")
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe])
    assert trainer.signal_route() == ("extra_pass", "no capture during generation: INTRINSIC_GENERATION_CAPTURE_MIB=0")
    trainer._generate(PROMPTS)
    assert trainer._batch.signals is None
    # a bound below what the batch needs: the same fallback, warned once
    monkeypatch.setenv("INTRINSIC_GENERATION_CAPTURE_MIB", "0.01")
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe])
    assert trainer.signal_route()[0] == "generation"
    rows, hidden = 8, trainer._policy.config.hidden_size
    need = capture_bytes(rows, 12, hidden, 1 + len(trainer._lens.layers), 4)
    assert need > 0.01 * 2**20  # the bound really is exceeded
    with caplog.at_level(logging.WARNING, logger="intrinsic"):
        for _ in range(2):
            trainer._generate(PROMPTS * 2)
            assert trainer._batch.signals is None
    assert sum("would hold" in r.getMessage() for r in caplog.records) == 1


def test_capture_stops_when_generation_fails(tiny_model_dir, tmp_path):
    """An exception inside generate leaves no armed capture behind; the next batch is captured normally."""
    probe = CaptureProbe()
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe])
    calls = []

    def explode(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = trainer._policy.base_model.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        trainer._generate(PROMPTS)
    handle.remove()
    assert trainer._gen_capture is None and trainer._lens._steps is None
    # a later no-grad forward outside generation stores nothing
    with torch.no_grad():
        trainer.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert trainer._gen_capture is None and trainer._lens._steps is None
    trainer._generate(PROMPTS)
    assert trainer._batch.signals is not None and trainer._batch.lens_states is not None


def test_failed_capture_falls_back(tiny_model_dir, tmp_path, caplog):
    """A generation the capture does not understand (here: an extra forward of another width) -> extra pass."""
    probe = CaptureProbe()
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe])
    original = trainer._arm_generation

    def arm_then_odd_forward(*args):
        armed = original(*args)
        with torch.no_grad():
            trainer._policy(input_ids=torch.tensor([[5, 6]] * len(args[0])))  # an unexpected forward
        return armed

    trainer._arm_generation = arm_then_odd_forward
    with caplog.at_level(logging.WARNING, logger="intrinsic"):
        prompt_ids, completion_ids = trainer._generate(PROMPTS)[:2]
    assert trainer._batch.signals is None
    assert any("generation capture failed" in r.getMessage() for r in caplog.records)
    score(trainer, PROMPTS, completion_ids)  # the extra pass computes them
    assert len(probe.seen[-1]) == 4 and all(len(s["entropy"]) == len(c) for s, c in zip(probe.seen[-1], completion_ids))


def test_step_states_reject_what_is_not_one_generation():
    s = StepStates(rows=2, max_steps=2, prompt_width=3)
    s.add(torch.zeros(3, 3, 4))
    assert s.failed == "forward 0 saw 3 rows, expected 2"
    with pytest.raises(RuntimeError, match="3 rows"):
        s.states()
    s = StepStates(rows=2, max_steps=2, prompt_width=3)
    for value in (1.0, 2.0, 3.0):  # a third forward (ZeRO-3's synchronised steps) is ignored
        s.add(torch.full((2, 3 if value == 1.0 else 1, 4), value))
    assert s.failed is None and s.states()[:, :, 0].tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert s.gather([[1], [0, 1]])[:, 0].tolist() == [2.0, 1.0, 2.0]
    assert step_mask([1, 2], 2).tolist() == [[True, False], [True, True]]
