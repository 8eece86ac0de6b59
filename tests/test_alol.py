"""A-LoL: every loss variant against its formula, value head, sampler, precompute cache, a short run."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trainers import ALOL_VARIANTS, AdvantageSampler, ALoLConfig, ALoLTrainer, ValueHead, alol_loss

# ------------------------------------------------------------------------------------------------
# losses: explicit per-sample, per-token reference (python loops, no shared helpers)
# ------------------------------------------------------------------------------------------------

LOGPS = [[-0.2, -1.5, -3.0, -0.7], [-2.5, -0.1, -9.0, -9.0], [-0.05, -4.0, -1.0, -1.0]]
REF = [[-0.3, -0.2, -3.5, -0.1], [-0.5, -0.3, 5.0, 5.0], [-0.04, -4.5, -2.0, -2.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
R = [0.8, 0.1, 0.6]
A = [0.5, 0.2, -0.4]


def clip(ratio, eps):
    return min(max(ratio, 1 - eps), 1 + eps)


def reference_loss(variant, reduction, eps=0.9, beta=0.1, floor=0.1):
    out = []
    for lp, rf, m, r, a in zip(LOGPS, REF, MASK, R, A):
        toks = [i for i in range(len(m)) if m[i]]
        norm = 1.0 if reduction == "sum" else len(toks)
        nll = sum(-lp[i] for i in toks) / norm
        seq_ratio = clip(math.exp(sum(lp[i] - rf[i] for i in toks)), eps)
        if variant == "nll":
            loss = nll
        elif variant == "wbc":
            loss = r * nll
        elif variant == "r_gold":
            loss = r * sum(max(math.exp(lp[i]), floor) * -lp[i] for i in toks) / norm
        elif variant == "r_lol":
            loss = r * seq_ratio * nll
        elif variant == "a_lol":
            loss = a * seq_ratio * nll
        elif variant == "a_lol_seq":
            loss = a * sum(clip(math.exp(lp[i] - rf[i]), eps) * -lp[i] for i in toks) / norm
        elif variant == "a_lol_ref_free":
            loss = a * nll
        else:
            loss = a * nll + beta * sum(lp[i] - rf[i] for i in toks) / norm
        out.append(loss)
    return torch.tensor(out)


def tensors():
    logps = torch.tensor(LOGPS, requires_grad=True)
    return logps, torch.tensor(MASK, dtype=torch.bool), torch.tensor(REF), torch.tensor(R), torch.tensor(A)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("variant", ALOL_VARIANTS)
def test_loss_matches_formula(variant, reduction):
    logps, mask, ref, r, a = tensors()
    # padding holds garbage that must not leak
    garbage = torch.where(mask, logps, torch.tensor(float("nan")))
    loss, stats = alol_loss(garbage, mask, torch.where(mask, ref, torch.tensor(float("inf"))), r, a, variant=variant,
                            reduction=reduction)
    torch.testing.assert_close(loss, reference_loss(variant, reduction), rtol=1e-5, atol=1e-6)
    assert set(stats) == {"weight", "clipped"} and not stats["weight"].requires_grad


def test_ratio_clipping_at_both_bounds_and_sum_vs_mean():
    logps, mask, ref, r, a = tensors()
    # sequence log-ratios: row 0 -1.3, row 1 -1.8 (ratios 0.27, 0.17: below 0.8), row 2 +1.49 (4.4: above 1.2)
    _, stats = alol_loss(logps, mask, ref, r, a, variant="a_lol", epsilon=0.2)
    seq = [sum(LOGPS[b][i] - REF[b][i] for i in range(4) if MASK[b][i]) for b in range(3)]
    expected = [min(max(math.exp(s), 0.8), 1.2) for s in seq]
    torch.testing.assert_close(stats["weight"], torch.tensor(expected))
    assert min(expected) == pytest.approx(0.8) and max(expected) == pytest.approx(1.2)  # both bounds hit
    assert stats["clipped"].tolist() == [float(math.exp(s) < 0.8 or math.exp(s) > 1.2) for s in seq]
    # a_lol_seq clips per token: fraction of clipped tokens per row
    _, tok = alol_loss(logps, mask, ref, r, a, variant="a_lol_seq", epsilon=0.2)
    frac = [sum(1 for i in range(4) if MASK[b][i] and not 0.8 <= math.exp(LOGPS[b][i] - REF[b][i]) <= 1.2)
            / sum(MASK[b]) for b in range(3)]
    torch.testing.assert_close(tok["clipped"], torch.tensor(frac))
    # mean = sum / number of completion tokens, per sample
    s, _ = alol_loss(logps, mask, ref, r, a, variant="a_lol_ref_free", reduction="sum")
    m, _ = alol_loss(logps, mask, ref, r, a, variant="a_lol_ref_free", reduction="mean")
    torch.testing.assert_close(m, s / mask.sum(1))


def test_weights_carry_no_gradient_and_negative_advantage_pushes_down():
    logps, mask, ref, r, a = tensors()
    loss, stats = alol_loss(logps, mask, ref, r, a, variant="a_lol")
    loss.sum().backward()
    # d/dl_t [A w sum(-l)] with w detached = -A w on every completion token
    expected = -(a * stats["weight"])[:, None] * mask
    torch.testing.assert_close(logps.grad, expected)
    logps.grad = None
    loss, _ = alol_loss(logps, mask, ref, r, a, variant="a_lol_ref_free")
    loss.sum().backward()
    assert a[2] < 0 and (logps.grad[2][mask[2]] > 0).all()  # gradient descent lowers the likelihood of row 2
    assert (logps.grad[0][mask[0]] < 0).all()  # and raises the likelihood of a positive-advantage row
    logps.grad = None
    loss, _ = alol_loss(logps, mask, ref, r, a, variant="a_lol_kl", beta=0.5)
    loss.sum().backward()  # the KL penalty is differentiable: -A + beta per token
    torch.testing.assert_close(logps.grad, (-a[:, None] + 0.5) * mask)


def test_no_nan_when_probabilities_underflow():
    # 40 tokens at log-prob -200 each: exp(sum) underflows to 0 for policy and reference (naively 0/0)
    logps = torch.full((2, 40), -200.0, requires_grad=True)
    ref = torch.full((2, 40), -199.0)
    mask = torch.ones(2, 40, dtype=torch.bool)
    assert torch.isnan(logps.detach().sum(1).exp() / ref.sum(1).exp()).all()  # the naive ratio
    for variant in ALOL_VARIANTS:
        loss, stats = alol_loss(logps, mask, ref, torch.ones(2), torch.ones(2), variant=variant)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all(), variant
        assert torch.isfinite(stats["weight"]).all()
        logps.grad = None
    _, stats = alol_loss(logps, mask, ref, None, torch.ones(2), variant="a_lol")
    torch.testing.assert_close(stats["weight"], torch.full((2,), 0.1))  # exp(-40) clipped at 1 - 0.9


def test_bad_arguments():
    logps, mask, ref, r, a = tensors()
    with pytest.raises(ValueError, match="unknown A-LoL variant"):
        alol_loss(logps, mask, variant="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        alol_loss(logps, mask, None, r, a, variant="a_lol")
    with pytest.raises(ValueError, match="epsilon"):
        alol_loss(logps, mask, ref, r, a, epsilon=1.5)
    with pytest.raises(ValueError, match="variant"):
        ALoLConfig(output_dir="x", variant="nope", use_cpu=True)


# ------------------------------------------------------------------------------------------------
# value head, sampler
# ------------------------------------------------------------------------------------------------


def test_value_head_ignores_padding():
    torch.manual_seed(0)
    head = ValueHead(16, max_reward=3.0).eval()
    real = torch.randn(1, 4, 16)
    padded = torch.cat([real, 1e4 * torch.randn(1, 3, 16)], dim=1)
    other = torch.cat([real, -1e4 * torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    v_real = head(real, torch.ones(1, 4))
    torch.testing.assert_close(head(padded, mask), v_real)
    torch.testing.assert_close(head(other, mask), v_real)
    assert 0 < float(v_real) < 3.0
    assert torch.isfinite(head(padded, torch.zeros(1, 7))).all()  # an all-padding row does not NaN


def test_sampler_frequencies_proportional_to_advantage():
    advantages = torch.tensor([0.5, -0.3, 0.0, 1.5, 3.0, 0.0])
    sampler = AdvantageSampler(advantages, num_samples=60000, seed=3)
    counts = Counter(list(sampler))
    assert set(counts) == {0, 3, 4}  # A <= 0 never drawn
    for i, a in ((0, 0.5), (3, 1.5), (4, 3.0)):
        assert counts[i] / 60000 == pytest.approx(a / 5.0, abs=0.01)
    assert list(sampler) == list(AdvantageSampler(advantages, num_samples=60000, seed=3))  # same seed, same draw
    sampler.set_epoch(1)
    assert list(sampler)[:50] != list(AdvantageSampler(advantages, num_samples=60000, seed=3))[:50]
    uniform = Counter(AdvantageSampler(advantages, num_samples=30000, seed=0, uniform=True))
    assert all(c / 30000 == pytest.approx(1 / 3, abs=0.02) for c in uniform.values())
    with pytest.raises(ValueError, match="positive"):
        AdvantageSampler([0.0, -1.0])


# ------------------------------------------------------------------------------------------------
# trainer: precompute, alignment, cache, a short run
# ------------------------------------------------------------------------------------------------


def _rows(n=24):
    from recipes.common.tiny.tasks import ArithmeticSpec, arithmetic_rows

    rows = arithmetic_rows(ArithmeticSpec(n_train=n, seed=5), "train")
    # half right, half wrong answers
    return [{"prompt": r["question"], "completion": r["answer"] if i % 2 == 0 else str(int(r["answer"]) + 1),
             "answer": r["answer"]} for i, r in enumerate(rows)]


def _trainer(model_dir, tmp_path, variant="a_lol", value=True, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards import MathAccuracy

    args = dict(output_dir=str(tmp_path / "out"), variant=variant, max_steps=4, per_device_train_batch_size=8,
                learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1,
                alol_cache_dir=str(tmp_path / "cache"), value_epochs=2, value_learning_rate=1e-2,
                value_max_new_tokens=6, precompute_batch_size=8, max_length=64, seed=0, dataloader_num_workers=0)
    args.update(overrides)
    rows = _rows()
    value_rows = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in _rows(40)[24:]])
    return ALoLTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=ALoLConfig(**args),
                       train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir),
                       reward_funcs=[MathAccuracy()], value_dataset=value_rows if value else None)


def test_precompute_aligns_with_policy_and_cache_is_reused(tiny_model_dir, tmp_path, monkeypatch):
    import trainers.alol_precompute as pre

    trainer = _trainer(tiny_model_dir, tmp_path)
    alol = trainer.alol
    assert not alol.loaded_from_cache and alol.path.exists()
    assert alol.reward.tolist() == [1.0 if i % 2 == 0 else 0.0 for i in range(24)]
    torch.testing.assert_close(alol.advantage, alol.reward - alol.value)
    assert 0 < alol.stats["value_val_mse"] < 1 and alol.stats["value_rows"] == 16
    assert alol.kept_fraction == pytest.approx(float((alol.advantage > 0).float().mean()))
    # at step 0 the policy is the reference: its fused-head log-probs equal the cached ones (ratio 1)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    metrics = trainer._metrics["eval"]
    assert metrics["alol/importance_weight"][-1] == pytest.approx(1.0, abs=1e-4)
    assert metrics["alol/clip_fraction"][-1] == 0.0
    assert metrics["alol/batch_advantage"][-1] > 0  # only A > 0 rows are sampled
    # a second trainer on the same model + data + config loads the cache: no reference computation
    monkeypatch.setattr(pre, "_compute", lambda *a, **k: pytest.fail("reference pass ran despite the cache"))
    again = _trainer(tiny_model_dir, tmp_path, variant="a_lol_seq")
    assert again.alol.loaded_from_cache and again.alol.path == alol.path
    torch.testing.assert_close(again.alol.advantage, alol.advantage)
    # another config (no value head) is another key
    monkeypatch.undo()
    other = _trainer(tiny_model_dir, tmp_path, value=False)
    assert other.alol.path != alol.path and torch.equal(other.alol.value, torch.zeros(24))


def _expected_reward(model, tokenizer, questions, answers) -> float:
    """``E_{y ~ pi(.|x)}[math_accuracy]`` at T = 1, up to other spellings of the answer: the mean
    probability of the gold answer + EOS (teacher forcing; exact, no sampling noise)."""
    model.eval()
    texts = [q + a + tokenizer.eos_token for q, a in zip(questions, answers)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    starts = [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    with torch.no_grad():
        logps = torch.log_softmax(model(**enc).logits[:, :-1].float(), -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    ends = enc["attention_mask"].sum(1).tolist()
    return sum(float(logps[i, p - 1 : e - 1].sum().exp()) for i, (p, e) in enumerate(zip(starts, ends))) / len(texts)


def test_short_run_improves_training_reward(tiny_model_dir, tmp_path):
    """Offline pairs where every prompt has a right and a wrong answer (reward 1 / 0): a short A-LoL
    run samples only the rewarded rows and raises the policy's expected reward on the training prompts.
    (The A-LoL vs NLL comparison lives in configs/alol/tiny_arithmetic.yaml's table; at 200 steps here
    A-LoL also beats NLL, 0.48 vs 0.37, too slow for a unit test on 2 shared cores.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards import MathAccuracy

    questions = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    answers = [str(a + b) for a in range(10) for b in range(10)]
    rows = [{"prompt": q, "completion": c, "answer": a} for q, a in zip(questions, answers)
            for c in (a, str(int(a) + 1))]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = _expected_reward(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, questions, answers)
    args = ALoLConfig(output_dir=str(tmp_path / "out"), variant="a_lol", max_steps=100, per_device_train_batch_size=32,
                      learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                      use_cpu=True, logging_steps=10, alol_cache_dir=str(tmp_path / "cache"), max_length=32, seed=0,
                      dataloader_num_workers=0, scale_steps_by_kept_fraction=False, disable_tqdm=True)
    trainer = ALoLTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          reward_funcs=[MathAccuracy()], value_dataset=None)  # V = 0: A = R
    assert trainer.alol.kept_fraction == 0.5
    trainer.train()
    after = _expected_reward(trainer.model, tokenizer, questions, answers)
    logs = [h for h in trainer.state.log_history if "alol/batch_reward" in h]
    assert logs and all(h["alol/batch_reward"] == 1.0 for h in logs)  # only rewarded rows are sampled
    print(f"expected training reward: start {before:.5f}, after {after:.4f}")
    assert after > before + 0.1, (before, after)


def test_tiny_samples_uri(tiny_cache, warm_model_dir):
    from tests.conftest import TEST_WARMUP

    from recipes.common.tiny import parse_dataset_uri, resolve_tiny_dataset

    model = TEST_WARMUP.removeprefix("tiny://").replace("?", ";").replace("&", ";")
    uri = f"tiny://samples?model={model}&n_train=64&n_valid=8&n_test=20&temperature=1.0"
    assert parse_dataset_uri(uri).model_uri == TEST_WARMUP
    train, valid, test = (resolve_tiny_dataset(uri, s) for s in ("train", "validation", "test"))
    assert (len(train), len(valid)) == (64, 8) and 0 < len(test) <= 20
    assert set(train.column_names) == {"question", "answer", "completion"} and {"question", "answer"} <= set(valid.column_names)
    assert not set(train["question"]) & set(test["question"])


def test_reward_model_reward(tmp_path):
    from recipes.common.dry_run import tiny_reward_model
    from rewards import RewardModel, build_reward

    tiny_reward_model(tmp_path)  # a random 1-layer Qwen2 sequence classifier with the character tokenizer
    rm = build_reward("reward_model", name_or_path=str(tmp_path), batch_size=2, replace={"=": " = "})
    prompts, completions = ["1+2=", "3+4=", "10+1="], ["3", "7", "11"]
    scores = rm(prompts=prompts, completions=completions)
    raw = RewardModel(str(tmp_path), squash="identity")(prompts=prompts, completions=completions)
    assert rm.text("1+2=", "3") == "1+2 = 3"
    assert scores == pytest.approx([1 / (1 + math.exp(-x)) for x in RewardModel(str(tmp_path), squash="identity",
                                    replace={"=": " = "})(prompts=prompts, completions=completions)])
    assert all(0 < s < 1 for s in scores) and len(set(raw)) == 3
    import pickle

    assert pickle.loads(pickle.dumps(rm))(prompts=prompts, completions=completions) == pytest.approx(scores)


def test_recipe_dry_run_and_config_errors(tmp_path, capsys):
    from recipes.alol import ALoLRecipeConfig, run
    from recipes.common.cli import main

    with pytest.raises(SystemExit) as err:
        main("alol", ALoLRecipeConfig, run, ["--config", "configs/alol/tiny_arithmetic.yaml", "trainer.variant=ppo"])
    assert err.value.code == 2 and "variant must be one of" in capsys.readouterr().err
    reports = main("alol", ALoLRecipeConfig, run, ["--config", "configs/alol/llama-7b_hh.yaml", "--dry-run"])
    out = capsys.readouterr().out
    assert "dry run of configs/alol/llama-7b_hh.yaml" in out and "A-LoL precompute" in out
    assert set(reports["a_lol"]) == {"harmless_base", "helpful_base", "helpful_online", "helpful_rejection"}
    assert all(math.isfinite(r["reward"]) for r in reports["a_lol"].values())


def _pairs_file(path):
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b + (a % 2))}
        for a in range(8) for b in range(8)]))
    return path


def _alol_overrides(model_dir, data, out, cache) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.path={data}", "data.eval_split=train", "value_rows=9",
            "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=4",
            "trainer.value_epochs=2", "trainer.value_learning_rate=1e-2", "trainer.precompute_batch_size=5",
            f"trainer.output_dir={out}", f"trainer.alol_cache_dir={cache}", "eval.max_rows=4"]


def _cached(cache) -> tuple[str, dict]:
    (path,) = cache.glob("*/precompute.pt")
    return path.parent.name, torch.load(path, weights_only=False)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_alol_under_two_process_accelerate_launch(tmp_path, tiny_model_dir, engine):
    """The precompute is sharded over 2 ranks and merged once; it equals a single-process precompute,
    every rank holds the same advantages, each rank trains on its own draws, the model saves and reloads.

    ZeRO-3 partitions every parameter (the precompute runs before DeepSpeed's engine exists, on
    ``zero.Init`` shards: it must gather them) and the LM head is untied (gathered on its own)."""
    from recipes.alol import ALoLRecipeConfig, run
    from recipes.common.cli import main
    from tests.launcher import deepspeed_variant, launch_recipe, trainer_state, untie_embeddings

    data = _pairs_file(tmp_path / "pairs.jsonl")
    launch: str | Path = engine
    model_dir = tiny_model_dir
    if engine == "zero3":
        launch = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0)
        model_dir = untie_embeddings(tiny_model_dir, tmp_path / "untied")
    # the single-process reference: same data, model and options
    main("alol", ALoLRecipeConfig, run, ["--config", "configs/alol/tiny_arithmetic.yaml", "variants=[]",
         *_alol_overrides(model_dir, data, tmp_path / "single", tmp_path / "single_cache"),
         "trainer.max_steps=1", "eval.before_training=false"])
    out = tmp_path / "launched"
    result = launch_recipe("alol", "configs/alol/tiny_arithmetic.yaml", launch, "variants=[a_lol,a_lol_seq]",
                           "trainer.save_strategy=steps", "trainer.save_steps=1",
                           *_alol_overrides(model_dir, data, out, tmp_path / "cache"))
    log = result.stderr + result.stdout
    # computed once (sharded), then loaded by the second variant and broadcast; logged by the main process only
    assert log.count("A-LoL precompute: {") == 1 and log.count("A-LoL precompute (cached): {") == 1, log[-3000:]
    stats = json.loads((out / "a_lol" / "alol_precompute.json").read_text())
    assert stats["precompute_processes"] == 2 and stats["rows_per_process"] == [32, 32]  # sharded, not repeated
    assert not stats["loaded_from_cache"] and stats["value_rows"] == 9
    again = json.loads((out / "a_lol_seq" / "alol_precompute.json").read_text())
    assert again["loaded_from_cache"] and again["digest"] == stats["digest"]
    # the same cache key (the model's fingerprint reads whole weights under ZeRO-3) and the same values
    key, launched = _cached(tmp_path / "cache")
    single_key, single = _cached(tmp_path / "single_cache")
    assert key == single_key and single["stats"]["precompute_processes"] == 1
    assert torch.equal(launched["reward"], single["reward"]) and 0 < float(single["reward"].mean()) < 1
    assert float(single["value"].std()) > 1e-3  # a fitted head, not a constant
    torch.testing.assert_close(launched["value"], single["value"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(launched["ref_token_logps"]), torch.cat(single["ref_token_logps"]),
                               atol=1e-5, rtol=0)
    for variant in ("a_lol", "a_lol_seq"):
        steps = round(4 * stats["kept_fraction"])
        state = trainer_state(out / variant / f"checkpoint-{steps}")
        assert state["global_step"] == steps and 0 < stats["kept_fraction"] < 1
        logged = [h for h in state["log_history"] if "alol/importance_weight" in h]
        # step 1 runs the policy before any update: its log-probs (DDP, ZeRO-2 or ZeRO-3 forward) are the cached ones
        assert logged[0]["alol/importance_weight"] == pytest.approx(1.0, abs=1e-4)
        assert all(h["alol/batch_advantage"] > 0 for h in logged)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "a_lol")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), start.state_dict().values()))
    report = json.loads((out / "eval.json").read_text())
    assert {"reference", "a_lol", "a_lol_seq"} <= set(report)


def test_sampler_shards_one_priority_sample_over_ranks():
    """Each rank's dataloader gets its own batches of the one global priority draw (accelerate's sharding)."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = AdvantageSampler(torch.rand(50) - 0.3, num_samples=40, seed=3)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=4, drop_last=False)
    drawn = list(sampler)
    shards = [[i for b in BatchSamplerShard(batches, num_processes=2, process_index=r) for i in b] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 20 and sorted(shards[0] + shards[1]) == sorted(drawn)
    assert shards[0] == [i for k in range(0, 40, 8) for i in drawn[k : k + 4]]  # rank 0: batches 0, 2, 4, ...


# ------------------------------------------------------------------------------------------------
# the reference's HH layout, stop rule, length rule, baseline sampling and value head (issue 15)
# ------------------------------------------------------------------------------------------------

# an Anthropic HH dialogue as stored in the dataset's "chosen" column, split at the last assistant turn
HH_PROMPT = ("\n\nHuman: What are some good vegetables to plant in the fall?\n\nAssistant: Kale, spinach, garlic and "
             "onions all do well in cool weather.\n\nHuman: Which of those grows fastest?\n\nAssistant:")
HH_RESPONSE = " Spinach is usually ready to pick in about six weeks."


def _hh_args():
    from tests.test_paper_configs import load_as_written

    return load_as_written("configs/alol/llama-7b_hh.yaml").trainer


def test_hh_layout_is_the_references():
    """The HH config turns an HH dialogue into the layout the reference builds from the same turns
    (PRO's ``<|prompter|>`` / ``<|assistant|>`` list: joined, markers replaced, stripped, preamble first)."""
    from trainers.alol_dialogue import format_prompt

    args = _hh_args()
    turns = ["<|prompter|>What are some good vegetables to plant in the fall?",
             "<|assistant|>Kale, spinach, garlic and onions all do well in cool weather.",
             "<|prompter|>Which of those grows fastest?", "<|assistant|>"]
    joined = "".join(turns)
    for marker, turn in (("<|prompter|>", " ### Human: "), ("<|assistant|>", " ### Assistant: ")):
        joined = joined.replace(marker, turn)
    preamble = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.\n")
    reference = preamble + joined.strip()
    assert format_prompt(HH_PROMPT, args.prompt_preamble, args.prompt_replace) == reference
    assert reference == preamble + ("### Human: What are some good vegetables to plant in the fall? ### Assistant: "
                                    "Kale, spinach, garlic and onions all do well in cool weather. ### Human: Which of "
                                    "those grows fastest? ### Assistant:")
    assert format_prompt(HH_PROMPT) == HH_PROMPT  # no options: unchanged


def test_hh_generation_is_cut_at_the_next_human_turn():
    from trainers.alol_dialogue import finish_response

    args = _hh_args()
    assert args.stop_strings == ["###"]
    cut, stops = args.response_cut, args.stop_strings
    assert finish_response(HH_RESPONSE + "\nHuman: Thanks! And garlic?\nAssistant: Garlic", cut, stops) == HH_RESPONSE.strip()
    assert finish_response(HH_RESPONSE + "\n Human: ok", cut, stops) == HH_RESPONSE.strip()
    assert finish_response(HH_RESPONSE + "\n### Human: more", cut, stops) == HH_RESPONSE.strip()
    assert finish_response(HH_RESPONSE + " ###", cut, stops) == HH_RESPONSE.strip()  # stopped on "###"
    assert finish_response(HH_RESPONSE, cut, stops) == HH_RESPONSE.strip()
    assert finish_response(" a\nHuman: b", (), ()) == " a\nHuman: b"  # no options: unchanged


def test_stop_strings_end_greedy_generation(tiny_model_dir):
    """With a stop string, each greedy answer is the stop-free answer up to and including its first
    occurrence; greedy_responses then drops it (the reference's '###' rule)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.alol_dialogue import _greedy, greedy_responses

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a in range(6) for b in range(3)]
    full = [tok.decode(r, skip_special_tokens=True) for r in _greedy(model, tok, prompts, 12, 8)]
    chars = Counter(c for text in full for c in text if not c.isspace())
    stop = chars.most_common(1)[0][0]
    stopped = [tok.decode(r, skip_special_tokens=True) for r in _greedy(model, tok, prompts, 12, 8, [stop])]
    expected = [t[: t.index(stop) + 1] if stop in t else t for t in full]
    assert stopped == expected and any(stop in t for t in full)
    args = SimpleNamespace(stop_strings=[stop], response_cut=[])
    texts, ids = greedy_responses(model, tok, prompts, args, 12, 8)
    assert texts == [e.strip()[: -len(stop)].strip() if e.strip().endswith(stop) else e.strip() for e in expected]
    assert all(tok.decode(i, skip_special_tokens=True) == t for i, t in zip(ids, texts))


def test_long_prompt_keeps_its_response_and_a_cut_response_has_no_eos(tiny_model_dir, tmp_path):
    """Through the trainer's own dataset preparation: prompts left-truncated to 640 tokens and
    responses cut to 128 (EOS counted) *before* TRL's max_length (768, keep-start) truncation, so a
    700- or 900-token prompt keeps its response; a cut response carries no EOS, an uncut one keeps it."""
    import copy

    trainer = _trainer(tiny_model_dir, tmp_path, value=False)
    tok = trainer.processing_class
    args = copy.deepcopy(trainer.args)
    args.max_prompt_length, args.max_completion_length, args.max_length = 640, 128, 768
    digits = "0123456789" * 100
    rows = [{"prompt": digits[:700], "completion": "a" * 100, "answer": "1"},   # TRL alone: 68 response tokens
            {"prompt": digits[:900], "completion": "b" * 50, "answer": "1"},    # TRL alone: row dropped
            {"prompt": "1+1=", "completion": "c" * 200, "answer": "1"},         # cut: no EOS
            {"prompt": "1+2=", "completion": "d" * 127, "answer": "1"}]         # 127 + EOS = 128: kept whole
    prepared = trainer._prepare_dataset(Dataset.from_list(rows), tok, args, False, None, "long")
    assert len(prepared) == 4 and args.max_length == 768 and args.shuffle_dataset is False
    out = []
    for ids, labels in zip(prepared["input_ids"], prepared["labels"]):
        p = sum(1 for x in labels if x == -100)
        out.append((tok.decode(ids[:p]), ids[p:]))
    eos = tok.eos_token_id
    assert out[0][0] == digits[60:700] and out[0][1] == tok("a" * 100)["input_ids"] + [eos]
    assert out[1][0] == digits[260:900] and out[1][1] == tok("b" * 50)["input_ids"] + [eos]
    assert out[2][1] == tok("c" * 128)["input_ids"] and eos not in out[2][1]
    assert out[3][1] == tok("d" * 127)["input_ids"] + [eos]
    # the HH layout reaches the policy's tokens; the rewards keep the raw prompt
    args.prompt_preamble, args.prompt_replace = "Chat.\n", {"\n\nHuman: ": " ### Human: ", "\n\nAssistant:": " ### Assistant:"}
    hh = trainer._prepare_dataset(Dataset.from_list([{"prompt": "\n\nHuman: 1+1?\n\nAssistant:", "completion": " 2",
                                                      "answer": "2"}]), tok, args, False, None, "hh")
    assert hh["prompt"] == ["\n\nHuman: 1+1?\n\nAssistant:"]
    assert hh["input_ids"][0] == tok("Chat.\n### Human: 1+1? ### Assistant: 2")["input_ids"] + [eos]


def _reward_column_trainer(model_dir, tmp_path, variant, rewards, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"{i}+0=", "completion": str(i), "r": r} for i, r in enumerate(rewards)]
    args = ALoLConfig(output_dir=str(tmp_path / "out"), variant=variant, max_steps=1, per_device_train_batch_size=4,
                      report_to=[], save_strategy="no", use_cpu=True, alol_cache_dir=str(tmp_path / "cache"),
                      max_length=32, seed=0, dataloader_num_workers=0, reward_column="r", **overrides)
    return ALoLTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir),
                       value_dataset=None)


def test_baseline_sampling_follows_the_reward(tiny_model_dir, tmp_path):
    """wbc / r_gold / r_lol with baseline_priority_sampling draw row i with probability R_i / sum R
    (the reference's good_priority for the baselines); nll and the option off stay uniform."""
    rewards = [0.05, 0.1, 0.2, 0.4, 0.8, 0.0, 1.6, 0.85]
    total = sum(rewards)
    trainer = _reward_column_trainer(tiny_model_dir, tmp_path, "wbc", rewards, baseline_priority_sampling=True)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, AdvantageSampler) and len(sampler) == 7
    draws = 40000
    sampler.num_samples = draws
    counts = Counter(sampler)
    assert counts[5] == 0  # R = 0: never drawn
    observed = [counts[i] / draws for i in range(len(rewards))]
    assert max(abs(o - r / total) for o, r in zip(observed, rewards)) < 0.01
    assert max(abs(o - 1 / 7) for o in observed) > 0.1  # uniform sampling would fail the check above
    for variant in ("r_gold", "r_lol"):
        other = _reward_column_trainer(tiny_model_dir, tmp_path, variant, rewards, baseline_priority_sampling=True)
        assert torch.equal(other._get_train_sampler().weights, sampler.weights)
    for variant, option in (("wbc", False), ("nll", True)):
        plain = _reward_column_trainer(tiny_model_dir, tmp_path, variant, rewards, baseline_priority_sampling=option)
        assert not isinstance(plain._get_train_sampler(), AdvantageSampler)


def test_mha_value_head_ignores_padding_and_drops_out_in_training():
    torch.manual_seed(0)
    head = ValueHead(16, max_reward=2.0, kind="mha", num_heads=8, dropout=0.1)
    assert sum(p.numel() for p in head.parameters()) > 4 * 16 * 16  # input/output projections of 8 heads
    head.eval()
    real = torch.randn(2, 4, 16)
    padded = torch.cat([real, 1e4 * torch.randn(2, 3, 16)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]] * 2)
    torch.testing.assert_close(head(padded, mask), head(real, torch.ones(2, 4)))
    assert torch.isfinite(head(padded, torch.zeros(2, 7))).all()
    head.train()
    assert not torch.equal(head(real, torch.ones(2, 4)), head(real, torch.ones(2, 4)))  # dropout is on
    with pytest.raises(ValueError, match="divisible"):
        ValueHead(12, kind="mha", num_heads=8)


def _synthetic_value_data(n=120, width=16, learnable=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(int(torch.randint(3, 7, (1,), generator=g)), width, generator=g) for _ in range(n)]
    w = torch.randn(width, generator=g)
    if learnable:
        targets = torch.sigmoid(torch.stack([3 * (h.mean(0) @ w) / math.sqrt(width) for h in hidden]))
    else:
        targets = torch.rand(n, generator=g)
    return hidden, targets


def test_value_head_best_epoch_and_cross_validation():
    from trainers.value_head import cross_validate_value_head, fit_value_head

    hidden, targets = _synthetic_value_data()
    # best epoch on a held-out split: the kept head is the epoch with the lowest held-out MSE
    torch.manual_seed(0)
    head = ValueHead(16, kind="mha", num_heads=4, dropout=0.1)
    stats = fit_value_head(head, hidden, targets, epochs=8, lr=3e-2, batch_size=16, val_fraction=0.25, seed=0,
                           device="cpu", select="best")
    criteria = stats["value_epoch_criteria"]
    assert len(criteria) == 8 and stats["value_epoch"] == 1 + criteria.index(min(criteria))
    assert stats["value_val_mse"] == pytest.approx(min(criteria), rel=1e-5)
    # nothing held out: the epoch with the lowest mean training loss (the reference's rule)
    torch.manual_seed(0)
    stats = fit_value_head(ValueHead(16, kind="mha", num_heads=4), hidden, targets, epochs=5, lr=3e-2, batch_size=16,
                           val_fraction=0.0, seed=0, device="cpu", select="best")
    assert stats["value_val_mse"] is None and stats["value_val_rows"] == 0 and len(stats["value_epoch_criteria"]) == 5
    assert stats["value_epoch"] == 1 + stats["value_epoch_criteria"].index(min(stats["value_epoch_criteria"]))
    # the cross-validated diagnostic: a head beats the mean where the targets depend on the states, not where they are noise
    options = dict(folds=4, epochs=15, lr=1e-2, batch_size=16, seed=0, device="cpu")
    cv = cross_validate_value_head(lambda: ValueHead(16), hidden, targets, **options)
    assert cv["value_val_mse"] < 0.5 * cv["value_val_mse_of_mean"], cv
    noise_hidden, noise = _synthetic_value_data(learnable=False)
    cv = cross_validate_value_head(lambda: ValueHead(16), noise_hidden, noise, **options)
    assert cv["value_val_mse"] > 0.9 * cv["value_val_mse_of_mean"], cv


def test_hh_config_value_head_and_lengths():
    args = _hh_args()
    assert (args.value_head, args.value_num_heads, args.value_dropout, args.value_select) == ("mha", 8, 0.1, "best")
    assert args.value_val_fraction == 0.0 and args.value_cv_folds == 5 and args.baseline_priority_sampling
    assert (args.max_prompt_length, args.max_completion_length, args.max_length) == (640, 128, 768)
