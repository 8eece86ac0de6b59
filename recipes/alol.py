"""A-LoL: offline advantage-weighted policy gradients on existing (prompt, response) data.

    python -m recipes.alol --config configs/alol/tiny_arithmetic.yaml        # CPU, variants table
    accelerate launch --config_file launch/accelerate/ddp.yaml -m recipes.alol \\
        --config configs/alol/llama-7b_hh.yaml

Rewards come from ``rewards:`` (any registered reward, a dotted path, or ``reward_model``) or a
precomputed column (``trainer.reward_column``); the value head learns from the reference's greedy
answers to ``value_split``. With ``variants: [...]`` every listed loss trains from the same start
(the precompute is shared through the cache) and one table compares them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from rewards import build_reward, with_transform
from trainers import ALOL_VARIANTS, ALoLConfig, ALoLTrainer
from trainers.alol_dialogue import greedy_responses, policy_prompt_ids
from trainers.card import rewards_table
from trainers.distributed import Ranks, outside_zero3

from .common.cli import main
from .common.config import check_section, save_config
from .common.data import load_split, to_sft_format
from .common.errors import ConfigError
from .common.evaluation import format_table, write_report
from .common.modeling import load_model, load_tokenizer, lora_config
from .common.reward_eval import reward_report
from .common.schema import DataConfig, RecipeConfig, RewardSpec
from .common.training import card_sections, evaluation_model, held_out, release, resume_argument


@dataclass
class ALoLRecipeConfig(RecipeConfig):
    """Sections of the alol recipe; ``trainer:`` takes any field of ``ALoLConfig`` (``SFTConfig`` +)."""

    trainer_class = ALoLConfig
    evaluates_during_training = True  # eval.every_steps

    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "training reward (weighted sum)"})
    eval_rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "test-time reward (default: rewards)"})
    value_split: str | None = field(default="validation", metadata={"help": "split whose prompts train V(x) (null: V=0)"})
    value_rows: int | None = field(default=280, metadata={"help": "value-head prompts (null: the whole split)"})
    eval_sets: dict[str, dict] = field(
        default_factory=dict, metadata={"help": "label -> data overrides of one test set (default: data.eval_split)"}
    )
    variants: list[str] = field(default_factory=list, metadata={"help": "train each of these variants and compare"})


def _rewards(specs: list[RewardSpec]) -> tuple[list, list[float]]:
    return [with_transform(build_reward(s.name, **s.kwargs), s.transform) for s in specs], [s.weight for s in specs]


def eval_data(cfg: ALoLRecipeConfig) -> dict:
    if not cfg.eval_sets:
        test = held_out(cfg)
        return {} if test is None else {cfg.data.eval_split: test}
    out = {}
    for label, overrides in cfg.eval_sets.items():
        values = check_section(overrides, DataConfig, f"eval_sets.{label}", {(): cfg.source}, strict_required=False)
        data = replace(cfg.data, **values)
        out[label] = load_split(data, data.eval_split or data.split, cfg.eval.max_rows, cfg.source)
    return out


def evaluate(trainer, path: str | None, tokenizer, tests: dict, rewards, weights, cfg: ALoLRecipeConfig,
             name: str) -> dict:
    """Reward report of every test set, the prompts dealt over the processes (the reports on the main
    process, ``None`` elsewhere); under ZeRO-3 / FSDP on a whole copy of the model (``path``: ``None``
    for the starting model, else the saved ``output_dir``)."""
    with outside_zero3():
        return reports_of(evaluation_model(cfg, trainer, path), trainer, tokenizer, tests, rewards, weights, cfg, name)


def reports_of(model, trainer, tokenizer, tests: dict, rewards, weights, cfg: ALoLRecipeConfig, name: str) -> dict:
    """:func:`evaluate` of a given (whole) ``model``."""
    ranks = Ranks(trainer.accelerator)

    def respond(prompts, desc):  # generated as the value head's targets are: A-LoL layout and stop rule
        ids = policy_prompt_ids(tokenizer, prompts, trainer.args)
        return greedy_responses(model, tokenizer, ids, trainer.args, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                desc=desc)
    return {label: reward_report(model, tokenizer, data, rewards, weights, cfg.eval, desc=f"{name} {label}",
                                 ranks=ranks, respond=respond) for label, data in tests.items()}


def evaluate_during_training(trainer, tokenizer, tests: dict, rewards, weights, cfg: ALoLRecipeConfig) -> None:
    """``eval.every_steps``: the reward report of the first ``eval.every_rows`` rows of every test set, logged
    as ``eval_<metric>`` (``eval_<label>/<metric>`` with several test sets)."""
    from .common.periodic_eval import EvaluateEverySteps, held_out_slice

    rows = {label: held_out_slice(data, cfg.eval.every_rows) for label, data in tests.items()}

    def flat(model) -> dict | None:
        desc = f"step {trainer.state.global_step}"
        reports = reports_of(model, trainer, tokenizer, rows, rewards, weights, cfg, desc)
        if not trainer.is_world_process_zero():
            return None
        return {(f"{label}/{k}" if len(rows) > 1 else k): v for label, report in reports.items()
                for k, v in report.items() if k != "rows"}
    trainer.add_callback(EvaluateEverySteps(trainer, cfg.eval.every_steps, flat))


def alol_card(cfg: ALoLRecipeConfig, output_dir: str, reports: dict) -> dict[str, str]:
    """Model card sections: the recipe, the evaluation of this variant, the rewards (A-LoL's trainer keeps
    none: the precompute read them), the resolved config."""
    sections = card_sections(cfg, reports, output_dir)
    rewards = [(s.name, s.weight) for s in cfg.rewards] or [(f"column {cfg.trainer.reward_column}", 1.0)]
    return {"Rewards": rewards_table(rewards), **sections}


def run(cfg: ALoLRecipeConfig) -> dict:
    for v in cfg.variants:
        if v not in ALOL_VARIANTS:
            raise ConfigError(cfg.source, "variants", f"unknown variant {v!r} (variants: {list(ALOL_VARIANTS)})")
    if not cfg.rewards and not cfg.trainer.reward_column:
        raise ConfigError(cfg.source, "rewards", "A-LoL needs rewards (or trainer.reward_column)")
    if cfg.eval.backend != "hf":
        raise ConfigError(cfg.source, "eval.backend", "A-LoL's reward reports generate with transformers only: "
                                                      "set eval.backend=hf")
    if cfg.value_split and not cfg.rewards:
        raise ConfigError(cfg.source, "value_split", "the value head scores new responses: it needs rewards")
    raw = load_split(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source)
    if "completion" not in raw.column_names:
        raise ConfigError(cfg.source, "data.columns.completion", "A-LoL trains on responses: map a completion column")
    keep = [c for c in raw.column_names if c not in ("question", "prompt", "completion")]
    train = to_sft_format(raw, keep=keep)
    value = load_split(cfg.data, cfg.value_split, cfg.value_rows, cfg.source) if cfg.value_split else None
    funcs, weights = _rewards(cfg.rewards)
    eval_funcs, eval_weights = _rewards(cfg.eval_rewards) if cfg.eval_rewards else (funcs, weights)
    tests = eval_data(cfg)
    tokenizer = load_tokenizer(cfg.model)
    variants = cfg.variants or [cfg.trainer.variant]
    reports, precompute = {}, {}
    for i, variant in enumerate(variants):
        args: ALoLConfig = copy.deepcopy(cfg.trainer)
        args.variant = variant
        if len(variants) > 1:
            args.output_dir = str(Path(cfg.trainer.output_dir) / variant)
        model = load_model(cfg.model)
        trainer = ALoLTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              peft_config=None if cfg.model.adapter else lora_config(cfg.peft, model), reward_funcs=funcs,
                              reward_weights=weights, value_dataset=value,
                              cache_key_extra=f"{cfg.model.name_or_path}@{cfg.model.revision}:{cfg.model.adapter}")
        main_process = trainer.is_world_process_zero()
        precompute = trainer.alol.stats
        if i == 0 and tests and cfg.eval.before_training:  # every process evaluates its share
            reference = evaluate(trainer, None, tokenizer, tests, eval_funcs, eval_weights, cfg, "reference")
            if main_process:
                reports["reference"] = reference
        if main_process:
            save_config(cfg, args.output_dir)
            (Path(args.output_dir) / "alol_precompute.json").write_text(json.dumps(precompute, indent=2))
        trainer.card_sections = alol_card(cfg, args.output_dir, {})  # the card save_model writes
        if tests and cfg.eval.every_steps:
            evaluate_during_training(trainer, tokenizer, tests, eval_funcs, eval_weights, cfg)
        trainer.train(resume_from_checkpoint=resume_argument(args))
        trainer.save_model(args.output_dir)
        if main_process:  # the logged history beside the model, for `python -m recipes.plot`
            trainer.state.save_to_json(str(Path(args.output_dir) / "trainer_state.json"))
        if tests:
            result = evaluate(trainer, args.output_dir, tokenizer, tests, eval_funcs, eval_weights, cfg, variant)
            if main_process:
                reports[variant] = result
                labels = [label for label in ("reference", variant) if label in reports]
                table = {f"{label} [{test}]" if len(tests) > 1 else label: reports[label][test]
                         for label in labels for test in tests}
                trainer.card_sections = alol_card(cfg, args.output_dir, table)
                trainer.create_model_card()
        release(trainer)
        del trainer, model
    if reports:  # filled on the main process only
        flat = {f"{name} [{label}]" if len(tests) > 1 else name: r for name, per in reports.items() for label, r in per.items()}
        write_report({"precompute": precompute, **reports}, cfg.trainer.output_dir)
        print(f"A-LoL precompute: kept {precompute['kept_fraction']:.3f} of {precompute['rows']} rows, "
              f"reward mean {precompute['reward_mean']:.3f}, value val MSE {precompute.get('value_val_mse')} "
              f"(predicting the mean: {precompute.get('value_val_mse_of_mean')}; "
              f"{precompute.get('value_val_method')})")
        print(format_table(flat), flush=True)
    return reports


if __name__ == "__main__":
    main("alol", ALoLRecipeConfig, run)
