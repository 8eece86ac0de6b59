"""Supervised fine-tuning (TRL SFTTrainer) on prompt-completion data, evaluated before and after.

The tiny world's warm-up runs through this recipe, and so can any SFT stage of a pipeline::

    python -m recipes.sft --config configs/sft/tiny_arithmetic.yaml
    accelerate launch --config_file launch/accelerate/ddp.yaml -m recipes.sft --config FILE
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .cli import main
from .config import RecipeConfig, save_config
from .data import load_split, to_sft_format
from .evaluation import evaluate_model, format_table, write_report
from .modeling import load_model, load_tokenizer, lora_config
from .training import resume_argument


@dataclass
class SFTRecipeConfig(RecipeConfig):
    """Sections of the sft recipe; ``trainer:`` takes any field of TRL's ``SFTConfig``."""

    trainer_class = SFTConfig


def run(cfg: SFTRecipeConfig) -> dict:
    args: SFTConfig = cfg.trainer
    train = to_sft_format(load_split(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source))
    test = load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_rows, cfg.source) if cfg.data.eval_split else None
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    reports = {}
    if test is not None and cfg.eval.before_training:
        reports["before"] = evaluate_model(model, tokenizer, test, cfg.eval, desc="before")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(cfg.peft, model))
    if trainer.is_world_process_zero():
        save_config(cfg, args.output_dir)
    trainer.train(resume_from_checkpoint=resume_argument(args))
    trainer.save_model(args.output_dir)
    if test is not None and trainer.is_world_process_zero():
        reports["after"] = evaluate_model(trainer.model, tokenizer, test, cfg.eval, desc="after")
        write_report(reports, args.output_dir)
        print(format_table(reports), flush=True)
    return reports


if __name__ == "__main__":
    main("sft", SFTRecipeConfig, run)
