"""Held-out evaluation: accuracy of a model's final answers, and how well its internal signals know.

Greedy accuracy; sampled accuracy, pass@k (unbiased) and self-consistency over ``num_samples``
samples; for self-certainty, negative entropy and internal consistency the separation of right
from wrong sampled answers (Mann-Whitney AUROC and rank-biserial effect size) with a
reliability table (accuracy per signal quantile); IC-weighted self-consistency (SC+IC).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from datasets import Dataset

from rewards import InternalConsistency, plurality
from rewards.grading import answers_match_many, clusters, final_answers, grade
from trainers.distributed import Ranks, merge_shards
from trainers.lens import BATCH_MODES
from trainers.signals import token_signal_dicts

from .config import EvalConfig
from .generation import generate, prompt_texts


def internal_signals(model, tokenizer, prompts: list, completion_ids: list[list[int]], *, temperature: float,
                     batch_size: int = 64, certainty: bool = True, entropy: bool = False,
                     consistency: InternalConsistency | None = None, fallback_last_k: int | None = 4
                     ) -> dict[str, list]:
    """Per completion of a decoder-only ``model``, read as the RLIF trainer reads them
    (:func:`trainers.signals.token_signal_dicts`, one no-grad pass per batch):

    * ``self_certainty``: mean ``KL(U || softmax(z/T))`` over the completion (chunked, no ``(B, L, V)``);
    * ``negative_entropy`` (with ``entropy``): ``-mean_t H(softmax(z_t/T))``;
    * ``internal_consistency`` (with ``consistency``): its reward value from the logit lens at the
      answer tokens; consecutive identical prompts form the groups of the ``candidates`` mode; the
      ``candidates`` and ``calibrated`` modes estimate their thresholds over the whole set (the
      paper's dataset-level calibration).

    A completion without tokens (or answer positions) gets ``None``, and so does one holding an id
    outside the tokenizer (a padding row of the LM head; its signals are skipped, docs/METHODS.md §6).
    """
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(tokenizer, prompts)]
    names = ("self_certainty",) * certainty + ("entropy",) * entropy
    dicts = token_signal_dicts(model, tokenizer, prompt_ids, completion_ids, prompts, temperature=temperature,
                               signals=names, lens_modes=(consistency.mode,) if consistency else (),
                               lens_layers=consistency.layers if consistency else None, batch_size=batch_size,
                               fallback_last_k=fallback_last_k)

    def mean(values: torch.Tensor, sign: float = 1.0) -> float | None:
        return sign * float(values.mean()) if values.numel() else None

    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return {"self_certainty": [finite(mean(d["self_certainty"])) for d in dicts] if certainty else [],
            "negative_entropy": [finite(mean(d["entropy"], -1.0)) for d in dicts] if entropy else [],
            "internal_consistency": [finite(consistency.reduce(d)) for d in dicts] if consistency else []}


def mann_whitney_auc(positive: list[float], negative: list[float]) -> float:
    """P(a random ``positive`` value exceeds a random ``negative`` one), ties counting 1/2 (U / n1 n2).

    >>> mann_whitney_auc([3.0, 2.0], [1.0, 2.0])      # (1 + 1 + 1 + 0.5) / 4
    0.875
    """
    if not positive or not negative:
        return float("nan")
    pos, neg = torch.tensor(positive, dtype=torch.float64), torch.tensor(negative, dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(positive) * len(negative))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are right: ``1 - C(n-c, k) / C(n, k)``.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def correctness(completions: list[str], answers: list[str]) -> list[bool]:
    """Per completion, whether its final answer equals its gold answer (:func:`rewards.grading.grade`;
    a gold label that does not parse counts as wrong, and is logged)."""
    return [r == 1.0 for r in grade(list(completions), list(answers))]


def accuracy(completions: list[str], answers: list[str]) -> float:
    return sum(correctness(completions, answers)) / max(len(completions), 1)


def vote_accuracy(completions: list[str], answers: list[str], num_samples: int,
                  weights: list[float | None] | None = None) -> float:
    """Self-consistency: fraction of questions whose plurality answer over its ``num_samples``
    consecutive samples is right (answers vote together when math-verify calls them equal; the
    winning cluster's first answer is graded); with ``weights`` each sample's vote weighs that much (SC+IC;
    ``None`` weight = no vote).

    >>> vote_accuracy(["4", "5", "5", "7"], ["4", "7"], 2)    # ties go to the first sample: 4 (right), 5 (wrong)
    0.5
    >>> vote_accuracy(["4", "5", "5"], ["4"], 3), vote_accuracy(["4", "5", "5"], ["4"], 3, [0.9, 0.2, 0.3])
    (0.0, 1.0)
    """
    extracted = final_answers(list(completions))
    weights = [1.0] * len(extracted) if weights is None else [0.0 if w is None else w for w in weights]
    winners: list[str | None] = []
    for q in range(len(answers)):
        rows = list(range(q * num_samples, (q + 1) * num_samples))
        labels = clusters([extracted[i] for i in rows])
        label = plurality([labels[j] if weights[i] > 0 else None for j, i in enumerate(rows)],
                          [weights[i] for i in rows])
        winners.append(None if label is None else extracted[rows[labels.index(label)]])
    return sum(answers_match_many(winners, list(answers))) / max(len(answers), 1)


def separation(values: list[float | None], correct: list[bool], prefix: str) -> dict:
    """Mean of a signal over correct and incorrect answers, its Mann-Whitney AUC (correct > incorrect)
    and rank-biserial effect size ``2 AUC - 1`` (answers without a value are left out)."""
    right = [v for v, ok in zip(values, correct) if ok and v is not None]
    wrong = [v for v, ok in zip(values, correct) if not ok and v is not None]
    auc = mann_whitney_auc(right, wrong)
    return {f"{prefix}_correct": sum(right) / len(right) if right else float("nan"),
            f"{prefix}_incorrect": sum(wrong) / len(wrong) if wrong else float("nan"),
            f"{prefix}_auc": auc, f"{prefix}_effect": 2 * auc - 1}


def reliability(values: list[float | None], correct: list[bool], bins: int = 5, hist_bins: int = 20) -> dict:
    """Accuracy per signal quantile bin (a reliability table) and a histogram of the signal for right and
    wrong answers (what ``recipes.plot`` draws).

    >>> table = reliability([0.1, 0.2, 0.3, 0.9], [False, False, True, True], bins=2)["reliability"]
    >>> [(row["count"], row["accuracy"]) for row in table]
    [(2, 0.0), (2, 1.0)]
    """
    pairs = sorted((v, ok) for v, ok in zip(values, correct) if v is not None and math.isfinite(v))
    rows = []
    for b in range(bins):
        chunk = pairs[b * len(pairs) // bins : (b + 1) * len(pairs) // bins]
        if chunk:
            rows.append({"low": chunk[0][0], "high": chunk[-1][0], "count": len(chunk),
                         "mean": sum(v for v, _ in chunk) / len(chunk),
                         "accuracy": sum(ok for _, ok in chunk) / len(chunk)})
    out: dict = {"reliability": rows}
    if pairs:
        low, high = pairs[0][0], pairs[-1][0]
        width = (high - low) / hist_bins or 1.0
        counts = {True: [0] * hist_bins, False: [0] * hist_bins}
        for v, ok in pairs:
            counts[ok][min(int((v - low) / width), hist_bins - 1)] += 1
        out["histogram"] = {"edges": [low + i * width for i in range(hist_bins + 1)], "correct": counts[True],
                            "incorrect": counts[False]}
    return out


def _outputs(model, tokenizer, prompts: list, cfg: EvalConfig, desc: str, ic: InternalConsistency | None,
             read_signals: bool, seed: int) -> list[dict]:
    """Per prompt: the greedy completion, the sampled ones (texts and ids, seeded with ``seed``) and,
    with ``read_signals``, the sampled completions' internal signals."""
    out: list[dict] = [{} for _ in prompts]
    if not prompts:
        return out
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    if cfg.greedy:
        texts, _ = generate(model, tokenizer, prompts, do_sample=False, desc=f"{desc} greedy", **common)
        for o, t in zip(out, texts):
            o["greedy"] = t
    if cfg.sampled:
        n = cfg.num_samples
        torch.manual_seed(seed)
        texts, ids = generate(model, tokenizer, prompts, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                              num_return_sequences=n, desc=f"{desc} sampled", **common)
        for q, o in enumerate(out):
            o["sampled"], o["ids"] = texts[q * n : (q + 1) * n], ids[q * n : (q + 1) * n]
        if read_signals:
            _add_signals(model, tokenizer, prompts, out, cfg, ic)
    return out


def _add_signals(model, tokenizer, prompts: list, outputs: list[dict], cfg: EvalConfig, ic) -> None:
    n = cfg.num_samples
    values = internal_signals(model, tokenizer, [p for p in prompts for _ in range(n)],
                              [i for o in outputs for i in o["ids"]], temperature=cfg.temperature,
                              batch_size=cfg.batch_size, certainty=cfg.self_certainty, entropy=cfg.negative_entropy,
                              consistency=ic)
    for q, o in enumerate(outputs):
        o["signals"] = {name: v[q * n : (q + 1) * n] for name, v in values.items()}


def evaluate_model(model, tokenizer, data: Dataset, cfg: EvalConfig, desc: str = "eval", ranks: Ranks | None = None
                   ) -> dict | None:
    """Greedy and/or sampled accuracy on ``data``. With ``num_samples > 1`` also self-consistency
    (``vote_accuracy``); with ``cfg.self_certainty`` / ``cfg.internal_consistency`` the signal's
    mean over correct vs incorrect sampled answers and its AUC, and for IC the IC-weighted vote
    (``ic_vote_accuracy``, the paper's SC+IC).

    ``ranks`` (default: this process alone) deals the rows over the processes of a launch: each
    generates and reads signals for its share, the main process computes the report (``None``
    elsewhere). IC's batch-calibrated modes (``candidates``, ``calibrated``), calibrated over every
    sample, are read on the main process. Code rows (``eval.grader``) are graded by execution."""
    grade = code_grading(data, cfg)  # None: final answers against `answer`
    if grade is None and "answer" not in data.column_names:
        raise ValueError("evaluation needs an 'answer' column (map one in data.columns)")
    prompts = list(data["prompt"])
    answers = list(data["answer"]) if grade is None else [None] * len(prompts)
    ranks = ranks or Ranks(alone=True)
    ic = InternalConsistency(cfg.ic_mode, cfg.ic_layers) if cfg.internal_consistency else None
    wants_signals = cfg.sampled and bool(cfg.self_certainty or cfg.negative_entropy or ic)
    whole_set = ic is not None and ic.mode in BATCH_MODES
    mine = ranks.shard(list(range(len(prompts))))
    parts = ranks.gather_to_main((mine, _outputs(model, tokenizer, [prompts[i] for i in mine], cfg, desc, ic,
                                                 wants_signals and not whole_set, cfg.seed + 100_003 * ranks.rank)))
    if not ranks.main:
        return None
    outputs = merge_shards(parts, len(prompts))
    if wants_signals and whole_set:
        _add_signals(model, tokenizer, prompts, outputs, cfg, ic)
    report: dict = {"rows": len(prompts)}
    if ranks.world > 1:
        report["processes"] = ranks.world
    if cfg.greedy:
        greedy = [o["greedy"] for o in outputs]
        report["greedy_accuracy"] = accuracy(greedy, answers) if grade is None else \
            sum(grade(greedy, range(len(greedy)))) / max(len(greedy), 1)
    if cfg.sampled:
        n = cfg.num_samples
        texts = [t for o in outputs for t in o["sampled"]]
        gold = [a for a in answers for _ in range(n)]
        correct = correctness(texts, gold) if grade is None else \
            grade(texts, [q for q in range(len(answers)) for _ in range(n)])
        report["sampled_accuracy"] = sum(correct) / max(len(correct), 1)
        for k in sorted(set(cfg.pass_k or [1, n])):
            if k <= n:
                report[f"pass@{k}"] = sum(pass_at_k(n, sum(correct[q * n : (q + 1) * n]), k)
                                          for q in range(len(answers))) / max(len(answers), 1)
        if n > 1 and grade is None:  # a vote over final answers; code completions are not voted on
            report["vote_accuracy"] = vote_accuracy(texts, answers, n)
        if wants_signals and outputs:
            signals = {name: [v for o in outputs for v in o["signals"][name]] for name in outputs[0]["signals"]}
            report["calibration"] = {}
            for name, prefix, wanted in (("self_certainty", "sc", cfg.self_certainty),
                                         ("negative_entropy", "ne", cfg.negative_entropy),
                                         ("internal_consistency", "ic", ic is not None)):
                if wanted:
                    report.update(separation(signals[name], correct, prefix))
                    report["calibration"][name] = reliability(signals[name], correct)
            if ic is not None and n > 1 and grade is None:
                report["ic_vote_accuracy"] = vote_accuracy(texts, answers, n, signals["internal_consistency"])
    return report


def code_grading(data: Dataset, cfg: EvalConfig):
    """``None`` for answer grading (``eval.grader: answer``); for a code grader (``code``,
    ``output_prediction``) a function ``(texts, row indices) -> [correct]`` that runs the completions
    in a local sandbox (:mod:`rewards.code`), after checking the columns it reads."""
    from rewards.code import grade_rows
    from rewards.sandbox import LocalSandbox

    if cfg.grader == "answer":
        return None
    needed = {"code": ["tests"], "output_prediction": ["output"]}[cfg.grader]
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(f"eval.grader={cfg.grader} needs column(s) {missing} (columns: {data.column_names})")
    rows, sandbox = data.remove_columns(["prompt"]).to_list(), LocalSandbox(timeout=cfg.code_timeout)
    return lambda texts, index: grade_rows(texts, [rows[i] for i in index], cfg.grader, sandbox)


def _scalar_metrics(reports: dict[str, dict]) -> list[str]:
    return sorted({k for r in reports.values() for k, v in r.items() if k not in ("rows", "processes") and isinstance(v, (int, float))})


def format_table(reports: dict[str, dict]) -> str:
    """A plain-text table: one row per model, one column per scalar metric."""
    metrics = _scalar_metrics(reports)
    width = max(len(name) for name in reports) + 2
    lines = ["model".ljust(width) + "".join(m.rjust(20) for m in metrics)]
    for name, report in reports.items():
        cells = "".join((f"{report[m]:.3f}" if m in report else "-").rjust(20) for m in metrics)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def format_markdown(reports: dict[str, dict]) -> str:
    """The same table in Markdown (``eval.md``).

    >>> print(format_markdown({"base": {"rows": 2, "greedy_accuracy": 0.5}}))
    | model | greedy_accuracy |
    |---|---|
    | base | 0.500 |
    """
    metrics = _scalar_metrics(reports)
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, report in reports.items():
        lines.append(f"| {name} | " + " | ".join(f"{report[m]:.3f}" if m in report else "-" for m in metrics) + " |")
    return "\n".join(lines)


def write_report(reports: dict[str, dict], directory: str | Path, meta: dict | None = None) -> Path:
    """``<directory>/eval.json``: one entry per model label, plus ``_meta`` (config, model ids, data);
    ``<directory>/eval.md``: the scalar metrics as a Markdown table."""
    path = Path(directory) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**reports, **({"_meta": meta} if meta else {})}, indent=2, default=str))
    path.with_suffix(".md").write_text(format_markdown(reports) + "\n")
    return path


def read_reports(path: str | Path) -> dict[str, dict]:
    """The model reports of an ``eval.json`` (or of a run directory holding one), without ``_meta``."""
    path = Path(path)
    path = path / "eval.json" if path.is_dir() else path
    return {label: report for label, report in json.loads(path.read_text()).items() if not label.startswith("_")}
