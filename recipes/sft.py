"""Supervised fine-tuning (TRL SFTTrainer) on prompt-completion data, evaluated before and after.

The tiny world's warm-up runs through this recipe, and so can any SFT stage of a pipeline::

    python -m recipes.sft --config configs/sft/tiny_arithmetic.yaml
    accelerate launch --config_file launch/accelerate/ddp.yaml -m recipes.sft --config FILE
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .common.cli import main
from .common.data import load_split, to_sft_format
from .common.modeling import load_model, load_tokenizer, lora_config
from .common.schema import RecipeConfig
from .common.training import held_out, train_and_evaluate


@dataclass
class SFTRecipeConfig(RecipeConfig):
    """Sections of the sft recipe; ``trainer:`` takes any field of TRL's ``SFTConfig``."""

    trainer_class = SFTConfig
    evaluates_during_training = True  # eval.every_steps


def run(cfg: SFTRecipeConfig) -> dict:
    train = to_sft_format(load_split(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source))
    test = held_out(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    trainer = SFTTrainer(model=model, args=cfg.trainer, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(cfg.peft, model))
    return train_and_evaluate(cfg, trainer, tokenizer, test)


if __name__ == "__main__":
    main("sft", SFTRecipeConfig, run)
