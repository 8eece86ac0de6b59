"""Bookkeeping of the label-free zoo (:mod:`recipes.zoo`): one cached JSON per (method, seed, config
digest), the mean and spread of every metric over seeds, and the table in Markdown.

A cell file ``<cache>/<method>/seed<k>-<digest>.json`` (cache: ``<output_dir>/cells`` by default) holds one trained-and-evaluated
run: its held-out report (:func:`recipes.evaluation.evaluate_model`), the logged training history and
timings. The digest covers everything that decides the cell's numbers except the seed (which names
the file): the method's resolved config, the zoo's model, data and evaluation settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

SPREAD = "sample standard deviation over seeds (n - 1 in the denominator)"

# metric -> column header, in table order; other ``*_auc`` / ``*_accuracy`` metrics follow (a new
# signal's AUROC in recipes.evaluate shows up without a change here)
COLUMNS = {"greedy_accuracy": "greedy", "sampled_accuracy": "sampled", "vote_accuracy": "vote (SC)",
           "ic_vote_accuracy": "SC+IC vote", "sc_auc": "AUROC self-cert.", "ne_auc": "AUROC -entropy",
           "ic_auc": "AUROC IC", "train_accuracy": "train acc. (last log)"}
COMPACT = ("greedy_accuracy", "sampled_accuracy", "vote_accuracy", "sc_auc", "ic_auc")


def digest(value) -> str:
    """12 hex digits of the SHA-256 of ``value`` as canonical JSON (keys sorted).

    >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1}), len(digest(0))
    (True, 12)
    """
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cell_path(root: str | Path, method: str, seed: int, key: str) -> Path:
    return Path(root) / method / f"seed{seed}-{key}.json"


def read_cell(path: Path) -> dict | None:
    """A finished cell, or ``None`` (absent, or unreadable: a cell being written when a run was killed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_cell(path: Path, cell: dict) -> Path:
    """Written whole or not at all (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2, default=str))
    tmp.replace(path)
    return path


def mean_spread(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` (0 for a single value) and
    ``n``, non-finite values left out.

    >>> [round(v, 6) for v in mean_spread([0.8, 0.9, 1.0])], mean_spread([0.5]), mean_spread([float("nan")])[2]
    ([0.9, 0.1, 3], (0.5, 0.0, 1), 0)
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def scalars(report: dict) -> dict[str, float]:
    return {k: float(v) for k, v in report.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("rows", "processes")}


def aggregate(cells: list[dict]) -> dict[str, dict]:
    """Per method (in order of first appearance): its label, seeds, and every scalar metric of its
    cells' reports as ``{mean, std, n, values}`` (:func:`mean_spread`)."""
    table: dict[str, dict] = {}
    for cell in cells:
        label = cell.get("label") or cell["method"]
        row = table.setdefault(cell["method"], {"label": label, "seeds": [], "values": {}})
        row["seeds"].append(cell["seed"])
        for name, value in scalars(cell["report"]).items():
            row["values"].setdefault(name, []).append(value)
    for row in table.values():
        values = row.pop("values")
        row["metrics"] = {}
        for name, xs in values.items():
            mean, std, n = mean_spread(xs)
            row["metrics"][name] = {"mean": mean, "std": std, "n": n, "values": xs}
    return table


def columns(table: dict[str, dict], compact: bool = False) -> list[str]:
    present = {m for row in table.values() for m in row["metrics"]}
    known = [m for m in (COMPACT if compact else COLUMNS) if m in present]
    extra = [] if compact else sorted(m for m in present - set(COLUMNS) if m.endswith(("_auc", "_accuracy")))
    return known + extra


def cell_text(metric: dict | None) -> str:
    """``mean ± std`` (3 decimals), the mean alone for one seed, ``-`` when missing.

    >>> cell_text({"mean": 0.9, "std": 0.1, "n": 3}), cell_text({"mean": 0.5, "std": 0.0, "n": 1}), cell_text(None)
    ('0.900 ± 0.100', '0.500', '-')
    """
    if not metric or not metric["n"]:
        return "-"
    return f"{metric['mean']:.3f}" + (f" ± {metric['std']:.3f}" if metric["n"] > 1 else "")


def format_markdown(table: dict[str, dict], compact: bool = False, base: str | None = "base") -> str:
    """The zoo table: one row per method, ``mean ± std`` per metric, seeds per row, and (when the
    ``base`` row exists) the change of mean greedy accuracy from it."""
    metrics = columns(table, compact)
    gain = base in table and "greedy_accuracy" in metrics
    head = ["method", "seeds", *(COLUMNS.get(m, m) for m in metrics)] + (["Δ greedy vs base"] if gain else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, row in table.items():
        cells = [row["label"], str(len(row["seeds"])), *(cell_text(row["metrics"].get(m)) for m in metrics)]
        if gain:
            here, ref = row["metrics"].get("greedy_accuracy"), table[base]["metrics"]["greedy_accuracy"]
            cells.append("" if name == base or not here else f"{here['mean'] - ref['mean']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """The step-wise mean of several logged histories (``log_history`` of each seed): at every step,
    each numeric key averaged over the histories that logged it there.

    >>> mean_history([[{"step": 5, "reward": 0.2}], [{"step": 5, "reward": 0.4}, {"step": 10, "reward": 1.0}]])
    [{'step': 5, 'reward': 0.30000000000000004}, {'step': 10, 'reward': 1.0}]
    """
    steps: dict[int, dict[str, list[float]]] = {}
    for history in histories:
        for entry in history:
            if "step" not in entry:
                continue
            at = steps.setdefault(entry["step"], {})
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    at.setdefault(key, []).append(float(value))
    return [{"step": step, **{k: sum(v) / len(v) for k, v in at.items()}} for step, at in sorted(steps.items())]
