"""Small pieces every training recipe shares: held-out data, resume, the train-and-evaluate run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from datasets import Dataset

from trainers.card import ModelCardMixin
from trainers.distributed import Ranks, outside_zero3, parameters_sharded

from .config import save_config
from .data import load_split
from .evaluation import (check_backend, engine_for, evaluate_model, format_markdown, format_table, release_engine,
                         write_report)
from .modeling import load_model, model_init_kwargs, to_device
from .schema import RecipeConfig


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


def release(trainer) -> None:
    """Let this process build another trainer: accelerate allows one DeepSpeed ``Accelerator`` per
    process state, so the finished trainer's state is dropped (the process group stays)."""
    from accelerate.state import AcceleratorState, GradientState

    trainer.accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def evaluation_model(cfg: RecipeConfig, trainer, path: str | None):
    """The model this process evaluates (its share of the rows): the trainer's own, or, when its
    parameters are sharded over ranks (ZeRO-3, FSDP), a whole copy loaded from ``path`` (``None``:
    the starting model; else the saved ``output_dir``, a full model or a PEFT adapter, read once every
    rank has finished saving); call it inside :func:`outside_zero3`."""
    if not parameters_sharded(trainer):
        return trainer.model
    if path is not None:
        trainer.accelerator.wait_for_everyone()
    if path is not None and (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **model_init_kwargs(cfg.model))
    else:
        model = load_model(cfg.model if path is None else dataclasses.replace(cfg.model, name_or_path=str(path)))
    return to_device(model, trainer.accelerator.device).eval()


def train_and_evaluate(cfg: RecipeConfig, trainer, tokenizer, test: Dataset | None) -> dict:
    """Evaluate (optionally), save the resolved config beside the checkpoints, train (resuming
    if asked), save the model, evaluate again; the main process reports ``{before, after}``.

    Evaluation deals the held-out rows over the processes (as ``recipes.evaluate`` does: the same
    numbers as one process for greedy decoding); under ZeRO-3 / FSDP (where a process holds only a
    shard) each evaluates a whole copy: the starting model before training, the saved model after."""
    args, main_process = trainer.args, trainer.is_world_process_zero()
    ranks = Ranks(trainer.accelerator)
    reports = {}
    if test is not None:  # eval.backend: vllm runs in one process; refused here, not after training
        check_backend(cfg.eval, ranks, cfg.source)
    if test is not None and cfg.eval.before_training:
        with outside_zero3():
            model = evaluation_model(cfg, trainer, None)
            engine = engine_for(cfg.eval, cfg.model, ranks=ranks, source=cfg.source)  # the starting model
            before = evaluate_model(model, tokenizer, test, cfg.eval, desc="before", ranks=ranks, engine=engine)
            del engine
        release_engine()
        if main_process:
            reports["before"] = before
    if main_process:
        save_config(cfg, args.output_dir)
    if isinstance(trainer, ModelCardMixin):  # the card save_model writes: recipe and config (evaluation below)
        trainer.card_sections = card_sections(cfg, {}, args.output_dir)
    if test is not None and cfg.eval.every_steps:  # the same evaluation on a held-out slice, every N steps
        from .periodic_eval import EvaluateEverySteps, held_out_slice

        rows = held_out_slice(test, cfg.eval.every_rows)
        trainer.add_callback(EvaluateEverySteps(trainer, cfg.eval.every_steps, lambda model: evaluate_model(
            model, tokenizer, rows, cfg.eval, desc=f"step {trainer.state.global_step}", ranks=ranks)))
    trainer.train(resume_from_checkpoint=resume_argument(args))
    trainer.save_model(args.output_dir)
    if main_process:  # the logged history beside the model, for `python -m recipes.plot`
        trainer.state.save_to_json(str(Path(args.output_dir) / "trainer_state.json"))
    if test is not None:
        with outside_zero3():
            model = evaluation_model(cfg, trainer, args.output_dir)
            engine = engine_for(cfg.eval, cfg.model, args.output_dir, ranks, cfg.source)  # vLLM: the saved model
            after = evaluate_model(model, tokenizer, test, cfg.eval, desc="after", ranks=ranks, engine=engine)
            del engine
        release_engine()
        if main_process:
            reports["after"] = after
            write_report(reports, args.output_dir)
            print(format_table(reports), flush=True)
    if reports and isinstance(trainer, ModelCardMixin):
        trainer.card_sections = card_sections(cfg, reports, args.output_dir)
        trainer.create_model_card()
    return reports


def card_sections(cfg: RecipeConfig, reports: dict, output_dir: str) -> dict[str, str]:
    """The model card's sections a recipe knows (:class:`trainers.card.ModelCardMixin`): how it was run,
    the evaluation table (``eval.md``'s) and the resolved config (``config.yaml``, read on the main process)."""
    sections = {"Recipe": f"`python -m {type(cfg).__module__} --config {cfg.source}`"
                          + (f" ({cfg.description})" if cfg.description else "")}
    if reports:
        sections["Evaluation"] = (f"Held-out evaluation (`eval.json`; up to {cfg.eval.max_rows or 'all'} rows, greedy "
                                  f"and {cfg.eval.num_samples} sampled answer(s) per prompt):\n\n"
                                  + format_markdown(reports))
    config = Path(output_dir) / "config.yaml"
    if config.exists():
        sections["Configuration"] = f"The resolved config (`config.yaml`):\n\n```yaml\n{config.read_text()}```"
    return sections
