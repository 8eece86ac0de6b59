"""Held-out evaluation: accuracy of a model's final answers, and how well its internal signals know.

Greedy accuracy; sampled accuracy, pass@k (unbiased) and self-consistency over ``num_samples``
samples; for self-certainty, negative entropy, internal consistency and CLUE (centroids
cross-fit on the other half of the prompts) the separation of right from wrong sampled answers (Mann-Whitney AUROC and
rank-biserial effect size) with a reliability table (accuracy per signal quantile); IC-weighted
self-consistency (SC+IC); RPC's perplexity consistency per sample and the accuracy of the answer it selects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from datasets import Dataset

from rewards import InternalConsistency, PerplexityConsistency, plurality
from rewards.grading import answers_match_many, clusters, final_answers, grade
from trainers.distributed import Ranks, merge_shards
from trainers.lens import BATCH_MODES
from trainers.signals import token_signal_dicts

from .errors import ConfigError
from .generation import generate, prompt_texts
from .schema import EvalConfig


VLLM_MEMORY = 0.5  # share of the GPU vLLM takes: the transformers copy that reads the signals shares the GPU


def vllm_engine(model_cfg, path: str | None = None, seed: int = 0):
    """``eval.backend: vllm``: a ``vllm.LLM`` over ``path`` (a saved run directory) or else
    ``model_cfg.name_or_path`` (a Hub name or directory; a ``tiny://`` URI is resolved to its cached
    directory), with the model config's dtype, revision and ``trust_remote_code``. vLLM is imported here,
    only when asked for (the config check refuses the backend where it is not installed)."""
    import vllm

    from .tiny import is_tiny, resolve_tiny_model

    name = str(path) if path is not None else model_cfg.name_or_path
    name = resolve_tiny_model(name) if is_tiny(name) else name
    return vllm.LLM(model=name, tokenizer=name, dtype=model_cfg.dtype, revision=None if path else model_cfg.revision,
                    trust_remote_code=model_cfg.trust_remote_code, seed=seed, gpu_memory_utilization=VLLM_MEMORY)


def engine_for(cfg: EvalConfig, model_cfg, path: str | None = None, ranks: Ranks | None = None, source: str = "config"):
    """The generation engine :func:`evaluate_model` takes: ``None`` for ``eval.backend: hf``; for ``vllm``
    a :func:`vllm_engine` over ``path`` or the configured model, refused (a :class:`ConfigError`) in a
    launch of several processes."""
    if cfg.backend != "vllm":
        return None
    check_backend(cfg, ranks, source)
    return vllm_engine(model_cfg, path, cfg.seed)


def check_backend(cfg: EvalConfig, ranks: Ranks | None, source: str = "config") -> None:
    """``eval.backend: vllm`` generates in one process: refused (a :class:`ConfigError`) in a launch of several."""
    if cfg.backend == "vllm" and ranks is not None and ranks.world > 1:
        raise ConfigError(source, "eval.backend", "vLLM generation runs in one process (it batches the whole set "
                                                  "itself): evaluate without accelerate launch, or set eval.backend=hf")


def release_engine() -> None:
    """Return a dropped vLLM engine's GPU memory before the next one is built (the caller deletes
    its last reference first: ``del engine``)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_vllm(engine, tokenizer, prompts: list, *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                  top_p: float = 1.0, num_return_sequences: int = 1, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """:func:`generate` with a ``vllm.LLM``: the same prompt tokens (chat template applied, no special
    tokens added), the same sampling parameters (``n``, ``temperature``, ``top_p``, no top-k: vLLM's default,
    ``max_tokens = max_new_tokens``; greedy is temperature 0), prompt ``i`` seeded with ``seed + i`` so
    its samples do not depend on how vLLM batches. Texts (special tokens skipped) and token ids cut
    after the first EOS, grouped by prompt as :func:`generate` returns them."""
    from vllm import SamplingParams

    texts = prompt_texts(tokenizer, prompts)
    inputs = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    n = num_return_sequences
    params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                             top_p=top_p if do_sample else 1.0, seed=seed + i, skip_special_tokens=True)
              for i in range(len(inputs))]
    outputs = engine.generate(inputs, params, use_tqdm=False) if inputs else []
    decoded, ids_out, eos = [], [], tokenizer.eos_token_id
    for out in outputs:
        if len(out.outputs) != n:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} completions for a prompt, asked for {n}")
        for completion in out.outputs:
            row = list(completion.token_ids)
            ids_out.append(row[: row.index(eos) + 1] if eos in row else row)
            decoded.append(completion.text)
    return decoded, ids_out


def internal_signals(model, tokenizer, prompts: list, completion_ids: list[list[int]], *, temperature: float,
                     batch_size: int = 64, certainty: bool = True, entropy: bool = False,
                     consistency: InternalConsistency | None = None, fallback_last_k: int | None = 4,
                     clue: bool = False, logps: bool = False) -> dict[str, list]:
    """Per completion of a decoder-only ``model``, read as the RLIF trainer reads them
    (:func:`trainers.signals.token_signal_dicts`, one no-grad pass per batch):

    * ``self_certainty``: mean ``KL(U || softmax(z/T))`` over the completion (chunked, no ``(B, L, V)``);
    * ``negative_entropy`` (with ``entropy``): ``-mean_t H(softmax(z_t/T))``;
    * ``internal_consistency`` (with ``consistency``): its reward value from the logit lens at the
      answer tokens; consecutive identical prompts form the groups of the ``candidates`` mode; the
      ``candidates`` and ``calibrated`` modes estimate their thresholds over the whole set (the
      paper's dataset-level calibration);
    * ``hidden_delta`` (with ``clue``): CLUE's ``(K, H)`` hidden-state delta over all layers (:mod:`trainers.clue`).
    * ``logps`` (with ``logps``): the per-token log-probs (1-D tensors), what perplexity consistency reads.

    A completion without tokens (or answer positions) gets ``None``, and so does one holding an id
    outside the tokenizer (a padding row of the LM head; its signals are skipped, docs/METHODS.md §6).
    """
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(tokenizer, prompts)]
    names = ("self_certainty",) * certainty + ("entropy",) * entropy + ("hidden_delta",) * clue + ("logps",) * logps
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
            "internal_consistency": [finite(consistency.reduce(d)) for d in dicts] if consistency else [],
            "hidden_delta": [d["hidden_delta"] for d in dicts] if clue else [],
            **({"logps": [d["logps"] for d in dicts]} if logps else {})}


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


def clue_column(deltas: list[torch.Tensor], correct: list[bool], num_samples: int) -> list[float | None]:
    """CLUE's score of each sample, its centroids fit on the gold labels of the *other half* of the
    prompts (2-fold cross-fitting over prompts: the first ``ceil(Q/2)`` prompts are scored with the
    centroids of the rest and vice versa; :func:`rewards.clue.leave_group_out_scores` with the two
    halves as groups and no earlier traces). A prompt's ``num_samples`` consecutive samples stay in
    one half. ``None``: not scorable (no finite delta, or a class missing from the other half).

    Not leave-one-prompt-out: removing a prompt's own samples from the centroids shifts them away from
    that prompt in proportion to its own labels, which biases a pooled AUROC below 0.5 when there is
    no signal; with two halves the centroids that score a sample never depend on its half's labels.
    """
    from rewards.clue import leave_group_out_scores

    if not deltas:
        return []
    stacked = torch.stack([d.double() for d in deltas])
    finite = stacked.flatten(1).isfinite().all(-1).tolist()
    labels = [int(ok) if f else None for ok, f in zip(correct, finite)]
    prompts = -(-len(deltas) // num_samples)
    cut = min(-(-prompts // 2) * num_samples, len(deltas))
    groups = [list(range(cut)), list(range(cut, len(deltas)))]
    scores = leave_group_out_scores(None, torch.zeros(2, dtype=torch.float64), stacked.nan_to_num(), labels, groups)
    return [float(v) if f and math.isfinite(v) else None for v, f in zip(scores.tolist(), finite)]


def selected_accuracy(scores: list[float | None], correct: list[bool], num_samples: int) -> float:
    """Fraction of prompts whose best-scored sample (first on ties) is right; a prompt with no score counts wrong.

    >>> selected_accuracy([0.1, 0.9, None, 0.2], [False, True, True, False], 2)
    0.5
    """
    right = 0
    for q in range(0, len(scores), num_samples):
        rows = [i for i in range(q, min(q + num_samples, len(scores))) if scores[i] is not None]
        right += bool(rows) and correct[max(rows, key=lambda i: (scores[i], -i))]
    return right / max(-(-len(scores) // num_samples), 1)


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
             read_signals: bool, seed: int, engine=None) -> list[dict]:
    """Per prompt: the greedy completion, the sampled ones (texts and ids, seeded with ``seed``) and,
    with ``read_signals``, the sampled completions' internal signals; generated by ``engine`` (a
    ``vllm.LLM``) when given, else by ``model``."""
    out: list[dict] = [{} for _ in prompts]
    if not prompts:
        return out
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)

    def gen(desc: str, batch_size: int, **kwargs) -> tuple[list[str], list[list[int]]]:
        if engine is not None:  # vLLM batches by itself
            return generate_vllm(engine, tokenizer, prompts, seed=seed, **kwargs)
        return generate(model, tokenizer, prompts, batch_size=batch_size, desc=desc, **kwargs)

    if cfg.greedy:
        texts, _ = gen(do_sample=False, desc=f"{desc} greedy", **common)
        for o, t in zip(out, texts):
            o["greedy"] = t
    if cfg.sampled:
        n = cfg.num_samples
        torch.manual_seed(seed)
        texts, ids = gen(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, num_return_sequences=n,
                         desc=f"{desc} sampled", **common)
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
                              consistency=ic, clue=cfg.clue, logps=cfg.perplexity_consistency)
    logps = values.pop("logps", None)
    for q, o in enumerate(outputs):
        o["signals"] = {name: v[q * n : (q + 1) * n] for name, v in values.items()}
        if logps is not None:  # RPC: each question's samples are one group
            o["signals"]["perplexity_consistency"] = PerplexityConsistency()(
                [None] * n, o["sampled"], token_signals=[{"logps": t} for t in logps[q * n : (q + 1) * n]])


def evaluate_model(model, tokenizer, data: Dataset, cfg: EvalConfig, desc: str = "eval", ranks: Ranks | None = None,
                   engine=None) -> dict | None:
    """Greedy and/or sampled accuracy on ``data``. With ``num_samples > 1`` also self-consistency
    (``vote_accuracy``); with ``cfg.self_certainty`` / ``cfg.internal_consistency`` the signal's
    mean over correct vs incorrect sampled answers and its AUC, and for IC the IC-weighted vote
    (``ic_vote_accuracy``, the paper's SC+IC).

    ``ranks`` (default: this process alone) deals the rows over the processes of a launch: each
    generates and reads signals for its share, the main process computes the report (``None``
    elsewhere). IC's batch-calibrated modes (``candidates``, ``calibrated``), calibrated over every
    sample, are read on the main process. Code rows (``eval.grader``) are graded by execution.
    ``engine`` (``eval.backend: vllm``, :func:`vllm_engine`; one process only) generates instead of
    ``model``, which still reads the signals."""
    if engine is not None and (ranks or Ranks(alone=True)).world > 1:
        raise ValueError("eval.backend=vllm generates in one process (vLLM batches the whole set itself): "
                         "run the evaluation without accelerate launch, or set eval.backend=hf")
    grade = code_grading(data, cfg)  # None: final answers against `answer`
    if grade is None and "answer" not in data.column_names:
        raise ValueError("evaluation needs an 'answer' column (map one in data.columns)")
    prompts = list(data["prompt"])
    answers = list(data["answer"]) if grade is None else [None] * len(prompts)
    ranks = ranks or Ranks(alone=True)
    ic = InternalConsistency(cfg.ic_mode, cfg.ic_layers) if cfg.internal_consistency else None
    wants_signals = cfg.sampled and bool(cfg.self_certainty or cfg.negative_entropy or ic or cfg.clue
                                         or cfg.perplexity_consistency)
    whole_set = ic is not None and ic.mode in BATCH_MODES
    mine = ranks.shard(list(range(len(prompts))))
    parts = ranks.gather_to_main((mine, _outputs(model, tokenizer, [prompts[i] for i in mine], cfg, desc, ic,
                                                 wants_signals and not whole_set, cfg.seed + 100_003 * ranks.rank,
                                                 engine)))
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
        elif n > 1 and cfg.grader == "choice":  # a vote over the chosen letters
            report["vote_accuracy"] = choice_vote_accuracy(texts, grade.gold, n, grade.letters)
        if wants_signals and outputs:
            signals = {name: [v for o in outputs for v in o["signals"][name]] for name in outputs[0]["signals"]}
            report["calibration"] = {}
            for name, prefix, wanted in (("self_certainty", "sc", cfg.self_certainty),
                                         ("negative_entropy", "ne", cfg.negative_entropy),
                                         ("internal_consistency", "ic", ic is not None),
                                         ("perplexity_consistency", "pc", cfg.perplexity_consistency)):
                if wanted:
                    report.update(separation(signals[name], correct, prefix))
                    report["calibration"][name] = reliability(signals[name], correct)
            if cfg.clue:  # scored with centroids from the other half of the prompts' gold labels only
                scores = clue_column(signals["hidden_delta"], correct, n)
                report.update(separation(scores, correct, "clue"))
                report["clue_selected_accuracy"] = selected_accuracy(scores, correct, n)
                report["calibration"]["clue"] = reliability(scores, correct)
            if ic is not None and n > 1 and grade is None:
                report["ic_vote_accuracy"] = vote_accuracy(texts, answers, n, signals["internal_consistency"])
            if cfg.perplexity_consistency and n > 1:
                report["pc_vote_accuracy"] = selected_accuracy(signals["perplexity_consistency"], correct, n)
    return report


def code_grading(data: Dataset, cfg: EvalConfig):
    """``None`` for answer grading (``eval.grader: answer``); for a code grader (``code``,
    ``output_prediction``) a function ``(texts, row indices) -> [correct]`` that runs the completions
    in a local sandbox (:mod:`rewards.code`), after checking the columns it reads."""
    from rewards.code import grade_rows
    from rewards.sandbox import LocalSandbox

    if cfg.grader == "answer":
        return None
    if cfg.grader == "choice":
        return choice_grading(data)
    needed = {"code": ["tests"], "output_prediction": ["output"]}[cfg.grader]
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(f"eval.grader={cfg.grader} needs column(s) {missing} (columns: {data.column_names})")
    rows, sandbox = data.remove_columns(["prompt"]).to_list(), LocalSandbox(timeout=cfg.code_timeout)
    return lambda texts, index: grade_rows(texts, [rows[i] for i in index], cfg.grader, sandbox)


def choice_grading(data: Dataset):
    """``eval.grader: choice``: a function ``(texts, row indices) -> [correct]`` comparing the option
    letter each completion chose (:func:`rewards.choice.extract_choice`) with the row's gold letter in
    ``answer``. The letters are ``A``, ``B``, ... as far as the data has such option columns
    (``data.choices`` makes them), else ``ABCD``; every gold must be one of them (checked here, before
    any model loads)."""
    from rewards.choice import LETTERS, extract_choice

    if "answer" not in data.column_names:
        raise ValueError("eval.grader=choice needs an 'answer' column holding the gold letter "
                         f"(set data.choices or map one in data.columns; columns: {data.column_names})")
    letters = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in data.column_names) or LETTERS
    gold = [str(a).strip().upper() for a in data["answer"]]
    bad = next((i for i, g in enumerate(gold) if len(g) != 1 or g not in letters), None)
    if bad is not None:
        raise ValueError(f"eval.grader=choice needs a gold letter ({', '.join(letters)}) in 'answer'; "
                         f"row {bad} holds {data['answer'][bad]!r}")

    def grade(texts, index) -> list[bool]:
        return [extract_choice(t, letters) == gold[i] for t, i in zip(texts, index)]

    grade.letters, grade.gold = letters, gold
    return grade


def choice_vote_accuracy(texts: list[str], gold: list[str], num_samples: int, letters: str = "ABCD") -> float:
    """Self-consistency for multiple choice: fraction of questions whose plurality letter over their
    ``num_samples`` consecutive samples is the gold one (ties to the letter chosen first; samples
    without a choice do not vote).

    >>> choice_vote_accuracy(["Answer: C", "(B)", "Answer: C", "A good try"], ["C", "A"], 2)  # C-B tie: C; C != A
    0.5
    """
    from rewards.choice import extract_choice

    chosen = [extract_choice(t, letters) for t in texts]
    right = 0
    for q, g in enumerate(gold):
        label = plurality(chosen[q * num_samples : (q + 1) * num_samples])
        right += label is not None and label == g
    return right / max(len(gold), 1)


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
