"""Self-improvement: sample, self-verify, filter or reweight, distill -- and log the generation-verification gap.

    python -m recipes.self_improve --config configs/self_improve/tiny_arithmetic.yaml

Each round samples ``improve.num_samples`` completions per unlabeled prompt from the current model,
scores them with the verifier (the ``rewards:`` section: majority_vote, self_certainty,
internal_consistency, ... with weights), keeps or weights them (``improve.selection``), optionally
drops the most distribution-shifted ones against a small valid set (IWSI's DS weight) and adds
NILE-filtered pairs of an existing instruction set, then fine-tunes on what is kept (TRL
``SFTTrainer``; weighted loss when reweighting). Gold answers, when the data have them, are only
logged: sample vs verifier-selected accuracy (the gap), precision of what is kept. A killed run
resumes at the first unfinished round.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from trl import SFTConfig

from trainers.distributed import Ranks, outside_zero3
from trainers.weighted_sft import WeightedSFTTrainer

from .common import rounds
from .common.cli import main
from .common.config import save_config
from .common.data import load_split
from .common.errors import ConfigError
from .common.evaluation import check_backend, engine_for, evaluate_model, format_table, release_engine
from .common.modeling import load_model, load_tokenizer, lora_config, model_init_kwargs, to_device
from .common.schema import DataConfig, RecipeConfig, RewardSpec
from .common.training import held_out, release


@dataclass
class ImproveConfig:
    """The self-improvement loop."""

    iterations: int = field(default=3, metadata={"help": "rounds of sample -> verify -> fine-tune"})
    num_samples: int = field(default=8, metadata={"help": "completions sampled per prompt"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (also of the internal signals)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget per completion"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generation / scoring batch"})
    selection: Literal["top_k", "threshold", "plurality", "reweight"] = field(
        default="plurality", metadata={"help": "filter (top_k per prompt, threshold, plurality answer) or reweight"})
    top_k: int = field(default=1, metadata={"help": "top_k: samples kept per prompt"})
    threshold: float = field(default=0.0, metadata={"help": "threshold: minimum verifier score"})
    min_share: float = field(default=0.0, metadata={"help": "plurality: keep a prompt only when this share of its "
                                                             "samples gives the plurality answer"})
    prompts_per_round: int | None = field(
        default=None, metadata={"help": "fresh prompts each round: round k takes the k-th slice of this many (cycling); "
                                        "null: every prompt every round"})
    start_from: Literal["previous", "base"] = field(
        default="previous", metadata={"help": "each round fine-tunes the previous round's weights or the base model"})
    ds_valid_rows: int = field(default=0, metadata={"help": "DS weight: valid rows with reference completions, taken "
                                                            "after the prompts of data.split (0: off; <= 5% of the prompts)"})
    ds_keep_fraction: float = field(default=0.8, metadata={"help": "DS weight: share of kept samples with the lowest DS kept"})


@dataclass
class SelfImproveRecipeConfig(RecipeConfig):
    """Sections of the self_improve recipe; ``trainer:`` is TRL's ``SFTConfig`` of each round's fine-tune."""

    trainer_class = SFTConfig

    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "the verifier: rewards and weights"})
    improve: ImproveConfig = field(default_factory=ImproveConfig, metadata={"help": "the self-improvement loop"})
    instructions: DataConfig | None = field(
        default=None, metadata={"help": "existing instruction pairs (question, completion) NILE-filtered each round"})


def check(cfg: SelfImproveRecipeConfig) -> None:
    imp = cfg.improve
    if cfg.model.adapter:  # each round saves and reloads a whole model; an adapter would be applied again each round
        raise ConfigError(cfg.source, "model.adapter", "self-improvement rounds fine-tune whole models: merge the adapter "
                          "into its base first (peft's merge_and_unload), or train a new one with peft:")
    for key, ok in (("iterations", imp.iterations >= 1), ("num_samples", imp.num_samples >= 1),
                    ("top_k", imp.top_k >= 1), ("min_share", 0 <= imp.min_share <= 1),
                    ("prompts_per_round", imp.prompts_per_round is None or imp.prompts_per_round >= 1), ("ds_valid_rows", imp.ds_valid_rows >= 0),
                    ("ds_keep_fraction", 0 < imp.ds_keep_fraction <= 1)):
        if not ok:
            raise ConfigError(cfg.source, f"improve.{key}", f"invalid value {getattr(imp, key)!r}")


def load_prompts(cfg: SelfImproveRecipeConfig):
    """Unlabeled prompts (gold answers kept for logging only) and the DS valid set (<= 5% of them)."""
    imp, n = cfg.improve, cfg.data.max_rows
    data = load_split(cfg.data, cfg.data.split, None if n is None else n + imp.ds_valid_rows, cfg.source)
    m = len(data) - imp.ds_valid_rows
    if imp.ds_valid_rows > 0.05 * m:
        raise ConfigError(cfg.source, "improve.ds_valid_rows", f"{imp.ds_valid_rows} valid rows exceed 5% of the "
                                                               f"{m} training prompts")
    valid = data.select(range(m, len(data))) if imp.ds_valid_rows else None
    if valid is not None and "completion" not in valid.column_names:
        raise ConfigError(cfg.source, "data.columns.completion", "DS weight needs reference completions")
    return data.select(range(m)), valid


def run(cfg: SelfImproveRecipeConfig) -> dict:
    """The rounds. Under ``accelerate launch`` sampling and its model passes are sharded over the
    processes, each round's fine-tune runs on all of them (DDP, ZeRO, FSDP), and the main process
    scores, selects, evaluates and writes; ``output_dir`` must be on a filesystem every process
    reads (each round's samples and model are read back from it)."""
    check(cfg)
    ranks = Ranks()
    check_backend(cfg.eval, ranks, cfg.source)  # eval.backend: vllm runs in one process
    verifier = rounds.build_verifier(cfg.rewards, cfg.source)
    prompts, valid = load_prompts(cfg)
    gold = list(prompts["answer"]) if "answer" in prompts.column_names else None
    pairs = None
    if cfg.instructions is not None:
        pairs = load_split(cfg.instructions, cfg.instructions.split, cfg.instructions.max_rows, cfg.source)
        pairs = pairs.select_columns(["prompt", "completion"])
    test, out = held_out(cfg), Path(cfg.trainer.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    if ranks.main:
        save_config(cfg, out)
    base = cfg.model.name_or_path
    report = {}
    if test is not None and cfg.eval.before_training:
        report["round_0"] = ranks.broadcast(rounds.finished(out / "round_0"))
        if report["round_0"] is None:
            report["round_0"] = ranks.broadcast(evaluate_saved(cfg, base, tokenizer, test, "round 0", ranks))
            if ranks.main:
                rounds.mark_done(out / "round_0", report["round_0"])
    current = base
    for k in range(1, cfg.improve.iterations + 1):
        here = out / f"round_{k}"
        done = ranks.broadcast(rounds.finished(here))
        if done is not None:
            rounds.load_verifier(verifier, here)  # a resumed run scores the next round as an uninterrupted one
        if done is None:
            done = one_round(cfg, k, here, current, base, tokenizer, verifier, prompts, gold, valid, pairs, test, ranks)
            if ranks.main:
                rounds.mark_done(here, done)
        report[f"round_{k}"] = done
        current = str(here / "model")
    if ranks.main:
        (out / "rounds.json").write_text(json.dumps(report, indent=2))
        print(format_table({name: {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                            for name, r in report.items()}), flush=True)
    return report


def whole_model(cfg: SelfImproveRecipeConfig, name_or_path: str, ranks: Ranks):
    """A whole copy of a model on this rank's device; call it inside :func:`outside_zero3`, which
    also keeps ``generate`` from syncing with the other ranks (sampling and evaluation)."""
    return to_device(load_model(dataclasses.replace(cfg.model, name_or_path=name_or_path)), ranks.device)


def evaluate_saved(cfg, name_or_path: str, tokenizer, test, desc: str, ranks: Ranks) -> dict | None:
    """Held-out metrics of a saved model, the rows dealt over the processes (every rank calls it; the
    metrics on the main process, ``None`` elsewhere)."""
    with outside_zero3():
        engine = engine_for(cfg.eval, cfg.model, None if name_or_path == cfg.model.name_or_path else name_or_path,
                            ranks, cfg.source)  # eval.backend: vllm, over the saved model
        report = evaluate_model(whole_model(cfg, name_or_path, ranks), tokenizer, test, cfg.eval, desc=desc, ranks=ranks,
                                engine=engine)
        del engine
        release_engine()
        return report


def one_round(cfg, k, here, current, base, tokenizer, verifier, prompts, gold, valid, pairs, test, ranks) -> dict:
    """Sample and score (sharded; skipped when a killed run saved them), fine-tune on what is kept
    (every process), save the model to ``here/model``, evaluate it (main process); the metrics on every rank."""
    imp = cfg.improve
    unsampled = ranks.broadcast(rounds.saved_samples(here) is None or not (here / "sampled.json").is_file())
    extra, nile_kept = None, None
    with outside_zero3():  # every rank samples on its own with a whole copy of the current model
        sampler = whole_model(cfg, current, ranks)
        if unsampled:
            torch.manual_seed(cfg.trainer.seed + k + 100_003 * ranks.rank)  # a resumed run samples what an uninterrupted one would
            rows = rounds.round_rows(len(prompts), imp.prompts_per_round, k)
            gold_k = None if gold is None else [gold[i] for i in rows]
            samples, metrics = rounds.score_round(sampler, tokenizer, verifier, [prompts[i]["prompt"] for i in rows],
                                                  gold_k, imp, valid, ranks)
            if ranks.main:
                rounds.save_verifier(verifier, here)  # before the samples, whose presence means "scored"
                rounds.save_samples(samples, here)
                (here / "sampled.json").write_text(json.dumps(metrics))
        else:
            rounds.load_verifier(verifier, here)
        if pairs is not None:
            extra, nile_kept = rounds.nile_pairs(sampler, tokenizer, pairs, imp, ranks)
    ranks.wait()
    samples = rounds.saved_samples(here)
    metrics = json.loads((here / "sampled.json").read_text())
    if pairs is not None:
        metrics["nile_kept_fraction"] = nile_kept
    train = rounds.training_set(samples, imp.selection == "reweight", extra)
    metrics["train_rows"] = 0 if train is None else len(train)
    if train is None:  # nothing kept: the round's model is the one it sampled from
        if ranks.main:
            sampler.save_pretrained(str(here / "model"))
            tokenizer.save_pretrained(str(here / "model"))
    else:
        del sampler
        model = load_model(cfg.model if imp.start_from == "base" else dataclasses.replace(cfg.model, name_or_path=current))
        args = rounds.round_args(cfg.trainer, here / "trainer", cfg.trainer.seed + k)
        trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                     peft_config=lora_config(cfg.peft, model))
        if len(trainer.train_dataset) == 0:
            raise ValueError(f"round {k}: every kept sample lost its completion to trainer.max_length truncation")
        trainer.train()
        metrics["train_loss"] = trainer.state.log_history[-1].get("train_loss", float("nan"))
        save_round_model(cfg, trainer, tokenizer, here, ranks)
        release(trainer)
        del trainer, model
    ranks.wait()
    if test is not None:
        held = evaluate_saved(cfg, str(here / "model"), tokenizer, test, f"round {k}", ranks)
        if ranks.main:
            metrics.update(held)
    return ranks.broadcast(metrics)


def save_round_model(cfg, trainer, tokenizer, here: Path, ranks: Ranks) -> None:
    """The fine-tuned weights as a full model in ``here/model`` (whole under ZeRO-3 / FSDP; a LoRA
    adapter, saved to ``here/adapter``, is merged into its base by the main process)."""
    if cfg.peft is None:
        trainer.save_model(str(here / "model"))
        return
    trainer.save_model(str(here / "adapter"))
    if ranks.main:
        from peft import AutoPeftModelForCausalLM

        with outside_zero3():
            merged = AutoPeftModelForCausalLM.from_pretrained(str(here / "adapter"), **model_init_kwargs(cfg.model))
        merged.merge_and_unload().save_pretrained(str(here / "model"))
        tokenizer.save_pretrained(str(here / "model"))


if __name__ == "__main__":
    main("self_improve", SelfImproveRecipeConfig, run)
