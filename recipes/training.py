"""Small pieces every training recipe shares: held-out data, resume, the train-and-evaluate run."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from .config import RecipeConfig, save_config
from .data import load_split
from .evaluation import evaluate_model, format_table, write_report


def resume_argument(args) -> bool | str | None:
    """``trainer.resume_from_checkpoint``: ``true`` -> the last checkpoint, a path -> that one."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    return True if str(value).lower() == "true" else value


def held_out(cfg: RecipeConfig) -> Dataset | None:
    """The evaluation split (``data.eval_split``, at most ``eval.max_rows``), or ``None``."""
    if not cfg.data.eval_split:
        return None
    return load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_rows, cfg.source)


def train_and_evaluate(cfg: RecipeConfig, trainer, tokenizer, test: Dataset | None) -> dict:
    """Evaluate (optionally), save the resolved config beside the checkpoints, train (resuming
    if asked), save the model, evaluate again; the main process reports ``{before, after}``."""
    args, main_process = trainer.args, trainer.is_world_process_zero()
    reports = {}
    if test is not None and cfg.eval.before_training and main_process:
        reports["before"] = evaluate_model(trainer.model, tokenizer, test, cfg.eval, desc="before")
    if main_process:
        save_config(cfg, args.output_dir)
    trainer.train(resume_from_checkpoint=resume_argument(args))
    trainer.save_model(args.output_dir)
    if main_process:  # the logged history beside the model, for `python -m recipes.plot`
        trainer.state.save_to_json(str(Path(args.output_dir) / "trainer_state.json"))
    if test is not None and main_process:
        reports["after"] = evaluate_model(trainer.model, tokenizer, test, cfg.eval, desc="after")
        write_report(reports, args.output_dir)
        print(format_table(reports), flush=True)
    return reports
