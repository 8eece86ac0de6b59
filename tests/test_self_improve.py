"""Self-improvement: selection on hand-built groups, DS weight, NILE, the gap, weighted SFT, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rewards import InternalConsistency, MajorityVote, SelfCertainty
from trainers.signals import token_signal_dicts
from recipes.common.verify import Verifier, ds_filter, ds_weights, gap_metrics, nile_filter, select, verifier_picks
from trainers.weighted_sft import weighted_sequence_loss

from tests.conftest import ROOT

# two groups of four: answers, scores, and the gold answer of each group
PROMPTS = ["a"] * 4 + ["b"] * 4
ANSWERS = ["4", "4", "5", None, "7", "8", "8", "9"]
SCORES = [0.9, 0.4, 0.95, 0.99, 0.1, 0.6, 0.3, None]


def test_top_k_threshold_and_unscorable_rows():
    # the unparseable answer (row 3) and the unscored row (7) never count, whatever their score
    assert select(SCORES, PROMPTS, ANSWERS, "top_k", top_k=2) == [1, 0, 1, 0, 0, 1, 1, 0]
    assert select(SCORES, PROMPTS, ANSWERS, "top_k", top_k=1) == [0, 0, 1, 0, 0, 1, 0, 0]
    assert select(SCORES, PROMPTS, ANSWERS, "threshold", threshold=0.5) == [1, 0, 1, 0, 0, 1, 0, 0]
    assert select(SCORES, PROMPTS, ANSWERS, "top_k", top_k=1, require_answer=False)[3] == 1.0


def test_plurality_filter_votes_with_scores_and_min_share():
    votes = [1.0] * 8  # a majority_vote-like verifier weighs every vote alike
    assert select(votes, PROMPTS, ANSWERS, "plurality") == [1, 1, 0, 0, 0, 1, 1, 0]
    # score-weighted votes: the two "4"s (0.9 + 0.4) outweigh the one "5" (0.95)
    assert select(SCORES, PROMPTS, ANSWERS, "plurality")[:3] == [1, 1, 0]
    # a heavy single vote wins over two light ones
    assert select([0.1, 0.1, 0.9], ["q"] * 3, ["4", "4", "5"], "plurality") == [0, 0, 1]
    # group a's plurality ("4") holds 2 of its 3 scorable samples, group b's ("8") 2 of 4
    assert select(votes, PROMPTS, ANSWERS, "plurality", min_share=0.7) == [0] * 8
    assert select(votes, PROMPTS, ANSWERS, "plurality", min_share=0.6) == [1, 1, 0, 0, 0, 0, 0, 0]
    assert select(votes, PROMPTS, ANSWERS, "plurality", min_share=0.5) == [1, 1, 0, 0, 0, 1, 1, 0]
    # answers vote after normalisation: 46 and 46.0 are one answer
    assert select([1.0] * 3, ["q"] * 3, ["46", "46.0", "7"], "plurality") == [1, 1, 0]


def test_reweight_normalises_within_groups():
    weights = select(SCORES, PROMPTS, ANSWERS, "reweight")
    a, b = weights[:4], weights[4:]
    assert a[3] == 0 and b[3] == 0  # no answer / no score
    assert sum(a) == pytest.approx(3) and sum(b) == pytest.approx(3)  # mean 1 over the scorable rows
    assert a[:3] == pytest.approx([0.9 * 3 / 2.25, 0.4 * 3 / 2.25, 0.95 * 3 / 2.25])
    assert select([-1.0, 0.0], ["q", "q"], ["1", "2"], "reweight") == [0.0, 0.0]  # nothing positive: nothing kept


def test_bad_selection_arguments():
    with pytest.raises(ValueError, match="selection mode"):
        select(SCORES, PROMPTS, ANSWERS, "best")
    with pytest.raises(ValueError, match="one entry per completion"):
        select(SCORES[:3], PROMPTS, ANSWERS, "top_k")


def test_gap_metrics_against_explicit_counts():
    gold = ["4"] * 4 + ["8"] * 4
    kept = select(SCORES, PROMPTS, ANSWERS, "top_k", top_k=2)
    m = gap_metrics(SCORES, PROMPTS, ANSWERS, gold, kept)
    correct = [a is not None and a == g for a, g in zip(ANSWERS, gold)]  # 4, 4, 8, 8 right
    assert m["sample_accuracy"] == sum(correct) / 8 == 0.5
    assert verifier_picks(SCORES, PROMPTS) == [3, 5]  # row 3 (no answer) is the best-scored of group a
    assert m["selected_accuracy"] == 0.5  # a: no answer (wrong); b: "8" (right)
    assert m["gap"] == m["selected_accuracy"] - m["sample_accuracy"] == 0.0
    assert m["relative_gap"] == 0.0
    # relative gap = gap / (1 - sample accuracy): group b's pick "8" right, group a's pick row 0 "4" right
    better = gap_metrics([9, 1, 1, 1, 1, 9, 1, 1], PROMPTS, ANSWERS, gold, kept)
    assert better["selected_accuracy"] == 1.0 and better["gap"] == 0.5
    assert better["relative_gap"] == pytest.approx(0.5 / (1 - 0.5))
    all_right = gap_metrics([1.0] * 4, ["a"] * 4, ["4"] * 4, ["4"] * 4, [1] * 4)
    assert all_right["gap"] == 0.0 and math.isnan(all_right["relative_gap"])
    assert m["kept_fraction"] == 4 / 8
    assert m["precision"] == 3 / 4  # kept rows 0, 2, 5, 6: 4 right, 5 wrong, 8 right, 8 right
    nothing = gap_metrics(SCORES, PROMPTS, ANSWERS, gold, [0] * 8)
    assert nothing["kept_fraction"] == 0 and math.isnan(nothing["precision"])


def test_verifier_combines_text_and_internal_rewards():
    signals = [{"self_certainty": torch.tensor([v])} for v in (2.0, 4.0, 1.0, float("nan"))]
    verifier = Verifier([MajorityVote(), SelfCertainty()], [1.0, 0.5])
    assert verifier.signals == ("self_certainty",) and not verifier.lens_modes
    scores = verifier.score(["q"] * 4, ["7", "7", "8", "7"], token_signals=signals)
    assert scores[:3] == [1 + 0.5 * 2, 1 + 0.5 * 4, 0 + 0.5 * 1]
    assert scores[3] is None  # a NaN signal makes the completion unscorable, not 0
    assert Verifier([MajorityVote(), SelfCertainty()], [1.0, 0.0]).score(["q"] * 2, ["7", "8"]) == [1.0, 0.0]
    assert Verifier([InternalConsistency(mode="soft")], [1.0]).lens_modes == ("soft",)
    with pytest.raises(ValueError):
        Verifier([MajorityVote()], [])


def test_ds_weight_and_filter_by_hand():
    ds = ds_weights([1.0, 1.2, 5.0, 0.1, float("nan")], [1.0, 1.0])
    assert ds[:4] == pytest.approx([1.0, 1.2, 5.0, 10.0]) and ds[4] == math.inf
    assert ds_filter([1, 1, 1, 1, 1], ds, keep_fraction=0.4) == [1, 1, 0, 0, 0]
    assert ds_filter([0, 1, 1, 1, 1], ds, keep_fraction=0.5) == [0, 1, 1, 0, 0]  # dropped rows stay dropped
    with pytest.raises(ValueError):
        ds_weights([1.0], [])
    with pytest.raises(ValueError):
        ds_filter([1], [1.0], keep_fraction=0)


def test_ds_weight_drops_the_shifted_sample(warm_model_dir):
    """Correct-looking samples under the model: the one written unlike the valid set's completions
    (leading zeros and a trailing repeat; same parsed answer) has the largest DS weight and goes."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.common.rounds import mean_nll, valid_nll
    from recipes.common.tiny.tasks import ArithmeticSpec, arithmetic_rows

    model, tok = AutoModelForCausalLM.from_pretrained(warm_model_dir), AutoTokenizer.from_pretrained(warm_model_dir)
    improve = SimpleNamespace(batch_size=8)
    rows = arithmetic_rows(ArithmeticSpec(n_train=20, seed=7), "train")
    valid = Dataset.from_list([{"prompt": r["question"], "completion": r["completion"]} for r in rows[:4]])
    samples = [(r["question"], r["completion"]) for r in rows[4:10]]
    shifted = (rows[10]["question"], "000" + rows[10]["completion"] + " " + rows[10]["completion"])
    samples.append(shifted)
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in samples]
    ds = ds_weights(mean_nll(model, tok, [p for p, _ in samples], ids, improve), valid_nll(model, tok, valid, improve))
    kept = ds_filter([1.0] * len(samples), ds, keep_fraction=0.8)
    assert max(range(len(ds)), key=ds.__getitem__) == len(samples) - 1
    assert kept[-1] == 0 and sum(kept) == math.ceil(0.8 * len(samples))


def test_nile_keeps_pairs_the_model_agrees_with():
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    model_answers = ["4", "4", "5", "9", "8", "8", None, None, None]
    assert nile_filter(["4.0", "9", "1"], model_answers, prompts) == [True, False, False]
    assert nile_filter(["4.0", "9", "1"], model_answers, prompts, require_plurality=False) == [True, True, False]
    with pytest.raises(ValueError):
        nile_filter(["4"], model_answers, prompts)


def test_token_signal_dicts_match_the_evaluator(warm_model_dir):
    """The verifier's per-token signals reduce to the evaluator's per-completion numbers (same math)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.common.evaluation import internal_signals
    from recipes.common.generation import generate

    model, tok = AutoModelForCausalLM.from_pretrained(warm_model_dir), AutoTokenizer.from_pretrained(warm_model_dir)
    prompts = ["12+34=", "12+34=", "5+7=", "5+7="]
    torch.manual_seed(0)
    _, ids = generate(model, tok, prompts[::2], max_new_tokens=5, batch_size=4, do_sample=True, temperature=1.0,
                      num_return_sequences=2)
    ic = InternalConsistency(mode="soft")
    reference = internal_signals(model, tok, prompts, ids, temperature=0.8, consistency=ic)
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    dicts = token_signal_dicts(model, tok, prompt_ids, ids, prompts, temperature=0.8,
                               signals=("self_certainty", "logps"), lens_modes=("soft",), batch_size=3)
    sc = SelfCertainty()(prompts, ["x"] * 4, token_signals=dicts)
    assert sc == pytest.approx(reference["self_certainty"], abs=1e-5)
    assert ic(prompts, ["x"] * 4, token_signals=dicts) == pytest.approx(reference["internal_consistency"], abs=1e-5)
    assert all(d["logps"].shape == (len(i),) and (d["logps"] <= 0).all() for d, i in zip(dicts, ids))
    with pytest.raises(ValueError, match="unknown signals"):
        token_signal_dicts(model, tok, prompt_ids, ids, prompts, temperature=1.0, signals=("surprise",))


def test_weighted_sequence_loss_matches_naive_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([2.0, 0.0, 0.5])
    logps = torch.where(mask, logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1), 0.0)
    trl_loss = -logps.sum() / mask.sum()  # TRL: token sum over the batch's token count
    ours = weighted_sequence_loss(trl_loss, logps, weights)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    naive = 0.0
    for i in range(3):  # explicit loops: sum_i w_i * sum_t -log p(y_it) / N
        for t in range(5):
            if mask[i, t]:
                naive = naive - weights[i] * torch.log_softmax(logits[i, t], -1)[targets[i, t]]
    naive = naive / mask.sum()
    (grad_naive,) = torch.autograd.grad(naive, logits)
    assert ours.item() == pytest.approx(naive.item(), rel=1e-5)
    assert torch.allclose(grad_ours, grad_naive, atol=1e-6)
    ones = weighted_sequence_loss(trl_loss, logps, torch.ones(3))
    assert ones.item() == pytest.approx(trl_loss.item(), rel=1e-6)


def test_weighted_sft_trainer_weights_the_loss(warm_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from trainers.weighted_sft import WeightedSFTTrainer

    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    rows = {"prompt": ["12+34=", "5+7=", "30+1="], "completion": ["46", "99", "31"], "weight": [1.0, 0.0, 2.0]}
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[], use_cpu=True,
                     learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, shuffle_dataset=False)
    trainer = WeightedSFTTrainer(model=AutoModelForCausalLM.from_pretrained(warm_model_dir), args=args,
                                 train_dataset=Dataset.from_dict(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["weight"].tolist()) == [0.0, 1.0, 2.0]  # the weights travel with their rows
    model = trainer.model
    with torch.no_grad():
        weighted = trainer.compute_loss(model, dict(batch)).item()
        plain = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "weight"}).item()
        logps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
        labels = batch["labels"][:, 1:]
        token = torch.where(labels != -100, logps.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    per_sequence, count = -token.sum(-1), (labels != -100).sum()
    assert plain == pytest.approx((per_sequence.sum() / count).item(), rel=1e-4)
    assert weighted == pytest.approx(((per_sequence * batch["weight"]).sum() / count).item(), rel=1e-4)
    # weight 0 everywhere: no gradient, parameters unchanged after a step
    zero = WeightedSFTTrainer(model=AutoModelForCausalLM.from_pretrained(warm_model_dir), args=args,
                              train_dataset=Dataset.from_dict({**rows, "weight": [0.0] * 3}), processing_class=tok)
    before = [p.detach().clone() for p in zero.model.parameters()]
    zero.train()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, zero.model.parameters()))


def _run(cfg_path, out, *extra):
    from recipes.common.cli import main
    from recipes.self_improve import SelfImproveRecipeConfig, run

    return main("self_improve", SelfImproveRecipeConfig, run,
                ["--config", str(cfg_path), f"trainer.output_dir={out}", *extra])


@pytest.fixture
def tiny_config(tmp_path, warm_model_dir):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
base: [{ROOT / 'configs/self_improve/tiny_arithmetic.yaml'}]
model: {{name_or_path: {warm_model_dir}}}
data: {{max_rows: 32}}
improve: {{num_samples: 4, prompts_per_round: 16, batch_size: 32, ds_valid_rows: 1}}
eval: {{max_rows: 24, num_samples: 2}}
trainer: {{max_steps: 2, per_device_train_batch_size: 16, logging_steps: 1}}
""")
    return path


def test_two_rounds_then_resume(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    first = _run(tiny_config, out, "improve.iterations=1")
    assert set(first) == {"round_0", "round_1"}
    marker = out / "round_1" / "DONE"
    stamp = marker.stat().st_mtime_ns
    samples = (out / "round_1" / "samples" / "dataset_info.json").stat().st_mtime_ns
    capsys.readouterr()
    report = _run(tiny_config, out, "improve.iterations=2")  # a restart: round 1 is read back, round 2 runs
    assert marker.stat().st_mtime_ns == stamp
    assert (out / "round_1" / "samples" / "dataset_info.json").stat().st_mtime_ns == samples
    assert report["round_1"] == first["round_1"]
    table = capsys.readouterr().out
    for name in ("round_0", "round_1", "round_2", "gap", "precision", "kept_fraction", "greedy_accuracy"):
        assert name in table
    saved = json.loads((out / "rounds.json").read_text())
    assert set(saved) == {"round_0", "round_1", "round_2"}
    r2 = saved["round_2"]
    assert r2["gap"] == pytest.approx(r2["selected_accuracy"] - r2["sample_accuracy"])
    if r2["sample_accuracy"] < 1:
        assert r2["relative_gap"] == pytest.approx(r2["gap"] / (1 - r2["sample_accuracy"]))
    assert r2["kept"] == r2["train_rows"] and 0 < r2["kept_fraction"] <= 1
    assert r2["ds_dropped"] >= 1  # 20% of the kept samples fail the DS screen
    from datasets import load_from_disk

    data = load_from_disk(str(out / "round_2" / "samples"))
    assert len(data) == 16 * 4 and {"prompt", "completion", "score", "weight", "gold", "ds_weight"} <= set(data.column_names)
    assert sum(w > 0 for w in data["weight"]) == r2["kept"]
    assert (out / "round_2" / "model" / "config.json").is_file()


def test_round_resumes_from_saved_samples(tiny_config, tmp_path):
    """A run killed after sampling (samples saved, no DONE) reuses the samples instead of regenerating them."""
    out = tmp_path / "run"
    _run(tiny_config, out, "improve.iterations=1", "eval.before_training=false")
    here = out / "round_1"
    (here / "DONE").unlink()
    stamp = (here / "samples" / "dataset_info.json").stat().st_mtime_ns
    report = _run(tiny_config, out, "improve.iterations=1", "eval.before_training=false")
    assert (here / "samples" / "dataset_info.json").stat().st_mtime_ns == stamp
    assert (here / "DONE").is_file() and "round_1" in report


def test_config_errors(tiny_config, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tiny_config, tmp_path / "x", "improve.ds_valid_rows=5")  # 5 > 5% of 32 prompts
    assert "ds_valid_rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tiny_config, tmp_path / "x", "improve.selection=best")
    assert "improve.selection" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tiny_config, tmp_path / "x", "rewards=[{name: majority_vote, weight: 0.0}]")
    assert "weight 0" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_rounds_under_two_process_accelerate_launch(tiny_config, tmp_path, warm_model_dir, engine):
    """Sampling and the verifier's model passes are sharded (each prompt's samples on one rank, merged
    in prompt order); the fine-tune runs on both ranks; the main process scores, saves and evaluates.

    DDP and FSDP2 fine-tune a LoRA adapter (merged into the round's model by the main process);
    ZeRO-3 partitions every parameter of an untied model (sampling and evaluation use whole copies)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from tests.launcher import deepspeed_variant, launch_recipe, untie_embeddings

    launch, model_dir, extra = engine, warm_model_dir, ["peft={r: 4, alpha: 8}"]
    if engine == "zero3":
        launch = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0)
        model_dir, extra = untie_embeddings(warm_model_dir, tmp_path / "untied"), []
    out = tmp_path / "run"
    launch_recipe("self_improve", tiny_config, launch, f"trainer.output_dir={out}", f"model.name_or_path={model_dir}",
                  "improve.iterations=1", "rewards=[{name: majority_vote, weight: 1.0}, {name: self_certainty, weight: 0.01}]",
                  "trainer.learning_rate=1e-3", *extra)
    report = json.loads((out / "rounds.json").read_text())
    assert set(report) == {"round_0", "round_1"} and (out / "round_1" / "DONE").is_file()
    r1 = report["round_1"]
    assert r1["sampled_per_process"] == [32, 32] and r1["kept"] == r1["train_rows"] > 0  # 16 prompts x 4, halved
    assert "greedy_accuracy" in report["round_0"] and "greedy_accuracy" in r1 and r1["ds_dropped"] >= 1
    data = load_from_disk(str(out / "round_1" / "samples"))
    assert data["group"] == [q for q in range(16) for _ in range(4)]
    prompts = [data["prompt"][4 * q] for q in range(16)]
    assert len(set(prompts)) == 16 and all(data["prompt"][4 * q + j] == prompts[q] for q in range(16) for j in range(4))
    gold = data["gold"]
    assert all(gold[4 * q] == gold[4 * q + 3] for q in range(16))  # gold answers followed their prompts
    scores = [s for s in data["score"] if not math.isnan(s)]
    assert len(scores) > 32 and len(set(scores)) > 8  # self-certainty read on every rank's samples
    assert (out / "round_1" / "adapter" / "adapter_config.json").is_file() == (engine != "zero3")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(out / "round_1" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
