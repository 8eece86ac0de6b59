"""Evaluation during training: every ``eval.every_steps`` optimizer steps, the recipe's own held-out
evaluation (sharded over the processes, as before and after training) runs on the model being trained
and its scalar numbers become training metrics.

Keys in ``trainer.state.log_history`` are the evaluation report's names with transformers' ``eval_``
prefix (``eval_greedy_accuracy``, ``eval_sampled_accuracy``, ``eval_vote_accuracy``, ``eval_pass@k``,
``eval_sc_auc`` / ``eval_ne_auc`` / ``eval_ic_auc`` for the signals' calibration AUROC, ...), so
TensorBoard and W&B show them as ``eval/greedy_accuracy``, ``eval/sc_auc``, ... (their ``eval_`` ->
``eval/`` rewrite), next to the numbers of ``eval.json``.

What the evaluation must not change:

* the random state of training: Python's, NumPy's and torch's (CPU and this process's GPU)
  generators are restored afterwards, so a run's losses are the same with or without it;
* the model's mode (train mode again afterwards; gradient checkpointing off during generation and
  back on, as TRL's ``unwrap_model_for_generation`` does);
* TRL's per-step training metrics: the numbers go in an entry of their own through
  ``transformers.Trainer.log`` (TRL's ``log`` would fold its pending training metrics into it).

Every process evaluates its share of the rows; the main process computes the report and broadcasts its
numbers, so every rank logs the same entry (the reporting callbacks write it once, from the main
process). Under DeepSpeed ZeRO-3 the parameters are gathered for the evaluation (TRL's
``unwrap_model_for_generation``: each rank holds the whole model while it generates its own rows,
with ZeRO-3's generation sync off); under FSDP on several processes the evaluation is skipped with a
warning (the recipes evaluate the saved model after training).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from trainers.distributed import Ranks, outside_zero3, parameters_sharded

logger = logging.getLogger("intrinsic")


@contextmanager
def preserved_rng():
    """Within: any use of the random generators; afterwards Python's, NumPy's and torch's (CPU and the
    current CUDA device) are as they were before."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def scalar_metrics(report: dict | None, prefix: str = "eval_") -> dict[str, float]:
    """The finite scalar numbers of a report, keys prefixed (row and process counts and nested tables left out).

    >>> scalar_metrics({"rows": 8, "greedy_accuracy": 0.5, "sc_auc": float("nan"), "calibration": {}})
    {'eval_greedy_accuracy': 0.5}
    """
    return {f"{prefix}{k}": float(v) for k, v in (report or {}).items()
            if k not in ("rows", "processes") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class EvaluateEverySteps(TrainerCallback):
    """Runs ``evaluate(model) -> report`` (the report on the main process, ``None`` elsewhere; every
    process calls it) every ``every_steps`` optimizer steps and logs its scalars as ``eval_*``."""

    def __init__(self, trainer, every_steps: int, evaluate: Callable[[torch.nn.Module], dict | None]):
        self.trainer, self.every_steps, self.evaluate = trainer, every_steps, evaluate
        self.ranks = Ranks(trainer.accelerator)
        self._warned = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_steps == 0:
            metrics = self.run()
            if metrics:
                should_log = control.should_log  # the step's own log is still to come: logging clears the flag
                Trainer.log(self.trainer, metrics)
                control.should_log = self.trainer.control.should_log = should_log
        return control

    def run(self) -> dict[str, float] | None:
        """The metrics (on every rank), or ``None`` where the evaluation cannot run."""
        from trl.models.utils import unwrap_model_for_generation


        trainer = self.trainer
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if parameters_sharded(trainer) and not (plugin is not None and plugin.zero_stage == 3):
            if not self._warned:
                logger.warning("eval.every_steps: skipped under FSDP on several processes (the model is sharded); "
                               "the saved model is evaluated after training")
                self._warned = True
            return None
        model, was_training = trainer.model, trainer.model.training
        try:
            with preserved_rng(), outside_zero3(), unwrap_model_for_generation(
                    trainer.model_wrapped, trainer.accelerator,
                    gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as unwrapped:
                report = self.evaluate(unwrapped)
        finally:
            model.train(was_training)
        return self.ranks.broadcast(scalar_metrics(report) if self.ranks.main else None)


def held_out_slice(data, every_rows: int | None):
    """The first ``every_rows`` rows of ``data`` (all of them for ``None``)."""
    return data if every_rows is None or every_rows >= len(data) else data.select(range(every_rows))
