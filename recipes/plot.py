"""Plots of training runs and evaluations, without a notebook or a display.

    python -m recipes.plot RUN_DIR [RUN_DIR ...] [--out DIR]

From each run's logged history (``trainer_state.json`` in the run directory or its last
checkpoint) it draws, one PNG per quantity and every run on the same axes: each reward's mean,
accuracy (``rewards/math_accuracy/mean`` when logged), self-certainty, entropy, completion length,
KL and loss over steps. From an ``eval.json`` (the evaluate recipe's, or a training run's) it
draws the histogram of each internal signal over right vs. wrong sampled answers. PNGs go to
``--out`` (default: the first run directory's ``plots/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# file name -> (title, metric keys: exact names, or a prefix ending in "/" for a family)
CURVES = {
    "reward": ("total reward (what is optimised)", ["reward"]),
    "rewards": ("reward mean per function", ["rewards/"]),
    "accuracy": ("accuracy (math_accuracy reward)", ["rewards/math_accuracy/mean"]),
    "self_certainty": ("self-certainty", ["signals/self_certainty/mean"]),
    "entropy": ("entropy", ["entropy", "signals/entropy/mean"]),
    "completion_length": ("completion length (tokens)", ["completions/mean_length"]),
    "kl": ("KL to the reference", ["kl"]),
    "loss": ("loss", ["loss"]),
    "eval_accuracy": ("held-out accuracy during training (eval.every_steps)",
                      ["eval_greedy_accuracy", "eval_sampled_accuracy", "eval_vote_accuracy"]),
    "eval_calibration": ("signal calibration AUROC during training (eval.every_steps)",
                         ["eval_sc_auc", "eval_ne_auc", "eval_ic_auc"]),
}


def load_history(run: Path) -> list[dict]:
    """The ``log_history`` of a run directory (its own trainer_state.json or its latest checkpoint's)."""
    candidates = [run / "trainer_state.json"] + sorted(run.glob("checkpoint-*/trainer_state.json"),
                                                       key=lambda p: int(p.parent.name.split("-")[-1]))[::-1]
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())["log_history"]
    return []


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    """One PNG per quantity in :data:`CURVES` that some run logged."""
    written = []
    for name, (title, keys) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for label, history in runs.items():
            logged = sorted({k for h in history for k in h})
            chosen = [k for k in logged for want in keys
                      if (want.endswith("/") and k.startswith(want) and k.endswith("/mean")) or k == want]
            for key in chosen:
                steps, values = series(history, key)
                if steps:
                    ax.plot(steps, values, marker=".", label=f"{label}: {key}" if len(chosen) > 1 else label)
                    drawn += 1
        if drawn:
            ax.set(title=title, xlabel="step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            written.append(out / f"{name}.png")
            fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_calibration(eval_json: Path, out: Path) -> list[Path]:
    """Histograms of each signal over right vs. wrong sampled answers, one PNG per (model, signal)."""
    written = []
    for label, report in json.loads(eval_json.read_text()).items():
        for signal, details in (report.get("calibration") or {}).items() if isinstance(report, dict) else ():
            hist = details.get("histogram")
            if not hist:
                continue
            edges = hist["edges"]
            width = edges[1] - edges[0]
            fig, ax = plt.subplots(figsize=(6, 4))
            for kind, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
                ax.bar(edges[:-1], hist[kind], width=width, align="edge", alpha=0.5, color=color, label=kind)
            auc = report.get({"self_certainty": "sc", "negative_entropy": "ne",
                              "internal_consistency": "ic"}.get(signal, signal) + "_auc")
            ax.set(title=f"{label}: {signal}" + (f" (AUC {auc:.3f})" if isinstance(auc, float) else ""),
                   xlabel=signal, ylabel="sampled answers")
            ax.legend()
            fig.tight_layout()
            slug = "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()
            written.append(out / f"calibration_{slug}_{signal}.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


def plot_bars(rows: dict[str, dict[str, tuple[float, float]]], out: Path, title: str = "held-out accuracy",
              name: str = "accuracy_bars") -> Path:
    """Grouped bars with error bars: ``rows`` maps a row label to ``{metric: (mean, spread)}``; one
    group per row, one bar per metric (e.g. the zoo's greedy / sampled / vote accuracy, mean ± std
    over seeds)."""
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        means = [row.get(metric, (float("nan"), 0.0))[0] for row in rows.values()]
        spreads = [row.get(metric, (0.0, 0.0))[1] for row in rows.values()]
        ax.bar(xs, means, width=width, yerr=spreads, capsize=3, label=metric)
    ax.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel="accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m recipes.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (training output_dir or evaluate output_dir)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    out = args.out or args.runs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    histories = {run.name: load_history(run) for run in args.runs}
    written = plot_curves({name: h for name, h in histories.items() if h}, out)
    for run in args.runs:
        if (run / "eval.json").exists():
            written += plot_calibration(run / "eval.json", out)
    if not written:
        parser.error("nothing to plot: no trainer_state.json history and no eval.json calibration in these runs")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
