"""GRPO with internal and verifiable rewards mixed freely (Intuitor, RENT, TTRL, GRPO-gold).

    python -m recipes.rlif --config configs/rlif/tiny_arithmetic_gold.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m recipes.rlif --config FILE
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rewards import MathAccuracy, build_reward, with_transform
from trainers import RLIFConfig, RLIFTrainer
from trainers.rlif import group_layout_problem

from .common.cli import main
from .common.data import load_split
from .common.errors import ConfigError
from .common.schema import DataConfig, RecipeConfig, RewardSpec
from .common.modeling import (load_model, load_tokenizer, lora_config, model_init_kwargs, quantization_config,
                       resolve_model_path)
from .common.training import held_out, train_and_evaluate


@dataclass
class RLIFRecipeConfig(RecipeConfig):
    """Sections of the RLIF recipes; ``trainer:`` takes any field of ``RLIFConfig`` (``GRPOConfig`` +)."""

    trainer_class = RLIFConfig
    evaluates_during_training = True  # eval.every_steps

    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "rewards and their weights"})
    log_accuracy: bool = field(
        default=True, metadata={"help": "add math_accuracy at weight 0 when the data have gold answers"}
    )
    eval_data: DataConfig | None = field(
        default=None,
        metadata={"help": "held-out data when they are not a split of the training data (e.g. MATH-500 after "
                          "training on MATH); its eval_split (else split) is read. null: data.eval_split"},
    )


def build_rewards(cfg: RLIFRecipeConfig, columns: list[str]) -> tuple[list, list[float]]:
    """Reward callables and weights; accuracy is logged (weight 0) whenever gold answers exist."""
    if not cfg.rewards:
        raise ValueError(f"{cfg.source}: rewards: at least one reward is needed")
    funcs = []
    for i, spec in enumerate(cfg.rewards):
        try:
            funcs.append(with_transform(build_reward(spec.name, **spec.kwargs), spec.transform))
        except (TypeError, ValueError) as err:  # bad keyword arguments: a config error, before any model loads
            raise ConfigError(cfg.source, f"rewards.{i}.kwargs", f"{spec.name}: {err}") from None
    weights = [spec.weight for spec in cfg.rewards]
    if cfg.log_accuracy and "answer" in columns and not any(isinstance(getattr(f, "reward", f), MathAccuracy) for f in funcs):
        funcs.append(MathAccuracy())
        weights.append(0.0)
    return funcs, weights


def policy_arguments(cfg: RLIFRecipeConfig) -> dict:
    """``model``, ``quantization_config`` and ``peft_config`` of the trainer: a path that TRL loads with
    ``model_init_kwargs`` (4-bit under ``model.quantization``, then a new LoRA from ``peft:``: QLoRA),
    or, with ``model.adapter``, the loaded model carrying that adapter, trained further."""
    if cfg.model.adapter:
        if cfg.trainer.model_init_kwargs:
            raise ConfigError(cfg.source, "trainer.model_init_kwargs", "with model.adapter the recipe loads the model "
                              "itself: set loading options in the model: section")
        return {"model": load_model(cfg.model), "quantization_config": None, "peft_config": None}
    return {"model": resolve_model_path(cfg.model.name_or_path), "quantization_config": quantization_config(cfg.model),
            "peft_config": lora_config(cfg.peft)}


def run(cfg: RLIFRecipeConfig) -> dict:
    args: RLIFConfig = cfg.trainer
    train = load_split(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source)
    train = train.remove_columns([c for c in ("completion",) if c in train.column_names])
    test = held_out(cfg) if cfg.eval_data is None else load_split(
        cfg.eval_data, cfg.eval_data.eval_split or cfg.eval_data.split, cfg.eval.max_rows, cfg.source)
    funcs, args.reward_weights = build_rewards(cfg, train.column_names)
    problem = group_layout_problem(args, funcs)
    if problem is not None:  # a vote over part of a group: refused before the model loads
        raise ConfigError(cfg.source, f"trainer.{problem[0]}", problem[1])
    tokenizer = load_tokenizer(cfg.model)
    policy = policy_arguments(cfg)
    if isinstance(policy["model"], str):  # TRL loads it (and warns if it is given kwargs it would ignore)
        args.model_init_kwargs = {**model_init_kwargs(cfg.model), **(args.model_init_kwargs or {})}
    trainer = RLIFTrainer(reward_funcs=funcs, args=args, train_dataset=train, processing_class=tokenizer, **policy)
    return train_and_evaluate(cfg, trainer, tokenizer, test)


if __name__ == "__main__":
    main("rlif", RLIFRecipeConfig, run)
