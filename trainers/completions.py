"""TRL's completion table, also as ``<output_dir>/completions.jsonl``, whatever ``report_to`` is.

With ``log_completions``, TRL's ``GRPOTrainer`` keeps the latest generation batch in ``self._logs``
(prompt, completion, one column per reward, the columns rewards and trainers add through
``log_extra``, advantage) and at every log prints it, writes it to ``completions/*.parquet`` and
sends it to W&B/Trackio. :class:`CompletionsJsonlMixin` appends the same rows, with the step, to one
JSON-lines file from the main process after TRL's ``log``; a batch already written (several log calls
within one generation batch) is not written again.

Columns the project adds: ``signals/<name>`` (the RLIF trainer: each completion's mean
self-certainty / entropy / log-prob, as the internal rewards read them), ``<reward>/answer`` and
``<reward>/voted_answer`` (``majority_vote``, ``consistency_vote``: the parsed answer and its group's
winner), ``consistency_vote/ic`` (the IC weight of each vote).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

COMPLETIONS_FILE = "completions.jsonl"


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def completion_rows(logs: dict, step: int) -> list[dict]:
    """Rows of TRL's completion table from its ``_logs`` (images left out; non-finite numbers -> ``None``).

    >>> completion_rows({"prompt": ["1+1="], "completion": ["2"], "rewards": {"math_accuracy": [1.0]},
    ...                  "extra": {"signals/entropy": [0.5]}, "advantages": [float("nan")]}, step=3)
    [{'step': 3, 'prompt': '1+1=', 'completion': '2', 'math_accuracy': 1.0, 'signals/entropy': 0.5, 'advantage': None}]
    """
    columns = {"prompt": list(logs["prompt"]), "completion": list(logs["completion"]),
               **{name: list(v) for name, v in logs["rewards"].items()},
               **{name: list(v) for name, v in logs["extra"].items()}, "advantage": list(logs["advantages"])}
    n = len(columns["prompt"])
    return [{"step": step, **{name: _plain(values[i]) if i < len(values) else None for name, values in columns.items()}}
            for i in range(n)]


class CompletionsJsonlMixin:
    """Put before ``GRPOTrainer`` in the bases; active with ``args.log_completions``."""

    _completions_written: str | None = None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.log_completions and self.accelerator.is_main_process:
            self._append_completions()

    def _append_completions(self) -> None:
        rows = completion_rows(self._logs, self.state.global_step)
        if not rows:
            return
        digest = hashlib.sha1(json.dumps([{k: v for k, v in r.items() if k != "step"} for r in rows],
                                         default=str).encode()).hexdigest()
        if digest == self._completions_written:
            return
        path = Path(self.args.output_dir) / COMPLETIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        self._completions_written = digest
