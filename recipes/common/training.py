"""Small pieces every training recipe shares: held-out data, resume, the train-and-evaluate run."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

from datasets import Dataset

from trainers.distributed import Ranks

from .config import save_config
from .data import load_split
from .evaluation import evaluate_model, format_table, write_report
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


def parameters_sharded(trainer) -> bool:
    """True when no single rank holds the whole model (DeepSpeed ZeRO-3, FSDP on several processes).

    Read from the accelerator's plugin: transformers' global ZeRO-3 flag is gone once training ends,
    while the model's parameters stay partitioned (a forward on one rank then waits forever)."""
    if trainer.args.world_size <= 1:
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return (plugin is not None and plugin.zero_stage == 3) or bool(getattr(trainer, "is_fsdp_enabled", False))


@contextmanager
def outside_zero3():
    """Within: ``from_pretrained`` builds an ordinary model (no ``zero.Init``) and ``generate`` does not
    sync with the other ranks, so one process can load and run a whole model on its own."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the live config (its plugin keeps it alive)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


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
    if test is not None and cfg.eval.before_training:
        with outside_zero3():
            model = evaluation_model(cfg, trainer, None)
            before = evaluate_model(model, tokenizer, test, cfg.eval, desc="before", ranks=ranks)
        if main_process:
            reports["before"] = before
    if main_process:
        save_config(cfg, args.output_dir)
    trainer.train(resume_from_checkpoint=resume_argument(args))
    trainer.save_model(args.output_dir)
    if main_process:  # the logged history beside the model, for `python -m recipes.plot`
        trainer.state.save_to_json(str(Path(args.output_dir) / "trainer_state.json"))
    if test is not None:
        with outside_zero3():
            model = evaluation_model(cfg, trainer, args.output_dir)
            after = evaluate_model(model, tokenizer, test, cfg.eval, desc="after", ranks=ranks)
        if main_process:
            reports["after"] = after
            write_report(reports, args.output_dir)
            print(format_table(reports), flush=True)
    return reports
