"""Plumbing of the self-improvement recipe: sample and self-verify one round, build its training
set, keep per-round state on disk (samples as a dataset, a ``DONE`` marker with the metrics).

Layout of a run (``trainer.output_dir``)::

    round_0/DONE                 held-out metrics of the starting model
    round_k/samples/             every sample of round k: prompt, completion, answer, score, weight, ...
    round_k/model/               weights after round k (the next round samples from them)
    round_k/DONE                 round k's metrics (JSON); a finished round is never redone
    rounds.json                  every finished round's metrics
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from datasets import Dataset, load_from_disk

from rewards import build_reward, with_transform
from rewards.grading import answers_match_many, final_answers
from trainers.distributed import Ranks, merge_shards
from trainers.lens import BATCH_MODES
from trainers.signals import token_signal_dicts

from .data import to_sft_format
from .errors import ConfigError
from .generation import generate, prompt_texts
from .schema import RewardSpec
from .verify import Verifier, ds_filter, ds_weights, gap_metrics, nile_filter, select

logger = logging.getLogger("intrinsic")


def build_verifier(specs: list[RewardSpec], source: str) -> Verifier:
    """The verifier of the ``rewards:`` section (config errors name the reward)."""
    if not specs:
        raise ConfigError(source, "rewards", "the verifier needs at least one reward")
    funcs = []
    for i, spec in enumerate(specs):
        try:
            funcs.append(with_transform(build_reward(spec.name, **spec.kwargs), spec.transform))
        except (TypeError, ValueError) as err:
            raise ConfigError(source, f"rewards.{i}.kwargs", f"{spec.name}: {err}") from None
    if not any(spec.weight for spec in specs):
        raise ConfigError(source, "rewards", "every verifier reward has weight 0")
    return Verifier(funcs, [spec.weight for spec in specs])


def sample(model, tokenizer, prompts: list, improve) -> tuple[list, list[str], list[list[int]]]:
    """``num_samples`` completions per prompt: (prompt per row, texts, token ids), grouped by prompt."""
    texts, ids = generate(model, tokenizer, prompts, max_new_tokens=improve.max_new_tokens,
                          batch_size=improve.batch_size, do_sample=True, temperature=improve.temperature,
                          top_p=improve.top_p, num_return_sequences=improve.num_samples, desc="sample")
    return [p for p in prompts for _ in range(improve.num_samples)], texts, ids


def mean_nll(model, tokenizer, prompts: list, completion_ids: list[list[int]], improve) -> list[float]:
    """Mean per-token NLL of each completion under ``model`` (the ``logps`` signal)."""
    prompt_ids = tokenizer(prompt_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    dicts = token_signal_dicts(model, tokenizer, prompt_ids, completion_ids, list(range(len(prompts))),
                               temperature=1.0, signals=("logps",), batch_size=improve.batch_size)
    return [-float(d["logps"].mean()) if d["logps"].numel() else math.inf for d in dicts]


def sample_shards(model, tokenizer, prompts: list, improve, ranks: Ranks, read=None):
    """:func:`sample` with the prompts dealt over the ranks (each prompt's samples stay on one rank).

    ``read(rows, ids, groups) -> {name: per-sample list}`` runs on the same rank right after its
    sampling (model passes: internal signals, NLL). The main process gets ``(rows, texts, ids, groups,
    read values, samples per rank)`` in prompt order, ``groups`` being prompt indices; the others ``None``.
    """
    mine = ranks.shard(list(range(len(prompts))))
    n = improve.num_samples
    per_prompt: list = []
    if mine:
        rows, texts, ids = sample(model, tokenizer, [prompts[i] for i in mine], improve)
        groups = [q for q in mine for _ in range(n)]
        values = read(rows, ids, groups) if read is not None else {}
        per_prompt = [(rows[j * n : (j + 1) * n], texts[j * n : (j + 1) * n], ids[j * n : (j + 1) * n],
                       {k: v[j * n : (j + 1) * n] for k, v in values.items()}) for j in range(len(mine))]
    parts = ranks.gather_to_main((mine, per_prompt))
    if not ranks.main:
        return None
    merged = merge_shards(parts, len(prompts))
    names = merged[0][3].keys() if merged else ()
    return ([r for m in merged for r in m[0]], [t for m in merged for t in m[1]], [i for m in merged for i in m[2]],
            [q for q in range(len(prompts)) for _ in range(n)], {k: [v for m in merged for v in m[3][k]] for k in names},
            [len(indices) * n for indices, _ in parts])


def score_round(model, tokenizer, verifier: Verifier, prompts: list, gold: list | None, improve,
                valid: Dataset | None = None, ranks: Ranks | None = None) -> tuple[Dataset | None, dict | None]:
    """Sample, score with the verifier, select (and DS-screen); the round's samples and metrics.

    Sampling and its model passes are sharded over ``ranks``; scoring and selection (which need
    whole groups and all samples) run on the main process, which alone gets the result (``None``
    elsewhere)."""
    ranks = ranks or Ranks()
    # IC's candidates mode calibrates its thresholds over every sample given: read it on the main
    # process over all of them, so a sharded round scores exactly as a single process would
    whole_set = verifier.internal and bool(set(BATCH_MODES) & set(verifier.lens_modes))

    def signals(rows, ids, groups) -> list[dict]:
        prompt_ids = tokenizer(prompt_texts(tokenizer, rows), add_special_tokens=False)["input_ids"]
        return token_signal_dicts(model, tokenizer, prompt_ids, ids, groups, temperature=improve.temperature,
                                  signals=verifier.signals, lens_modes=verifier.lens_modes,
                                  lens_layers=verifier.lens_layers(model), batch_size=improve.batch_size,
                                  delta_layers=verifier.delta_layers)

    def read(rows, ids, groups) -> dict:
        values = {}
        if verifier.internal and not whole_set:
            values["signals"] = signals(rows, ids, groups)
        if valid is not None:
            values["nll"] = mean_nll(model, tokenizer, rows, ids, improve)
        return values

    gathered = sample_shards(model, tokenizer, prompts, improve, ranks, read)
    if gathered is None:
        return None, None
    rows, texts, ids, groups, values, per_rank = gathered
    if whole_set:
        values["signals"] = signals(rows, ids, groups)
    labelled = {"answer": [g for g in gold for _ in range(improve.num_samples)]} if gold and verifier.reads_gold else {}
    scores = verifier.score(groups, texts, token_signals=values.get("signals"), **labelled)
    answers = final_answers(texts)
    weights = select(scores, groups, answers, improve.selection, top_k=improve.top_k, threshold=improve.threshold,
                     min_share=improve.min_share)
    columns = {"prompt": rows, "completion": texts, "group": groups, "answer_pred": answers,
               "score": [math.nan if s is None else s for s in scores], "weight": weights}
    metrics = {"sampled_per_process": per_rank}
    if valid is not None:  # IWSI: drop the most shifted of the kept samples
        ds = ds_weights(values["nll"], valid_nll(model, tokenizer, valid, improve))
        screened = ds_filter(weights, ds, improve.ds_keep_fraction)
        metrics["ds_dropped"] = sum(1 for a, b in zip(weights, screened) if a > 0 and b <= 0)
        columns.update(ds_weight=ds, weight=screened)
        weights = screened
    if gold is not None:
        columns["gold"] = [g for g in gold for _ in range(improve.num_samples)]
        metrics.update(gap_metrics(scores, groups, answers, columns["gold"], weights))
        right = answers_match_many(answers, columns["gold"])
        metrics["correct_kept"] = sum(w > 0 and r for w, r in zip(weights, right))
    else:
        metrics["kept_fraction"] = sum(w > 0 for w in weights) / max(len(weights), 1)
    metrics["kept"] = sum(w > 0 for w in weights)
    return Dataset.from_dict(columns), metrics


def round_rows(n: int, per_round: int | None, k: int) -> list[int]:
    """Prompt rows of round ``k`` (1-based): all of them, or the ``k``-th slice of ``per_round`` (cycling).

    >>> round_rows(5, None, 2), round_rows(5, 2, 1), round_rows(5, 2, 3), round_rows(5, 2, 4)
    ([0, 1, 2, 3, 4], [0, 1], [4, 0], [1, 2])
    """
    if per_round is None:
        return list(range(n))
    return [((k - 1) * per_round + j) % n for j in range(per_round)]


def valid_nll(model, tokenizer, valid: Dataset, improve) -> list[float]:
    """Mean NLL of the valid set's reference completions (EOS appended, as in generation)."""
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in valid["completion"]]
    return mean_nll(model, tokenizer, list(valid["prompt"]), ids, improve)


def nile_pairs(model, tokenizer, pairs: Dataset, improve, ranks: Ranks | None = None) -> tuple[Dataset, float]:
    """NILE: the instruction pairs whose answer the model's own plurality answer agrees with
    (sampling sharded over ``ranks``; every rank gets the result)."""
    ranks = ranks or Ranks()
    gathered = sample_shards(model, tokenizer, list(pairs["prompt"]), improve, ranks)
    keep = None
    if gathered is not None:
        _, texts, _, groups, _, _ = gathered
        keep = nile_filter(final_answers(list(pairs["completion"])), final_answers(texts), groups)
    keep = ranks.broadcast(keep)
    kept = pairs.select([i for i, k in enumerate(keep) if k])
    return kept, len(kept) / max(len(pairs), 1)


def training_set(samples: Dataset, weighted: bool, extra: Dataset | None = None) -> Dataset | None:
    """Kept samples (and NILE-kept pairs) as SFT rows; a ``weight`` column when reweighting."""
    kept = samples.filter(lambda row: row["weight"] > 0)
    data = kept.select_columns(["prompt", "completion"])
    weights = list(kept["weight"])
    if extra is not None and len(extra):
        from datasets import concatenate_datasets

        data = concatenate_datasets([data, extra.select_columns(["prompt", "completion"])])
        weights += [1.0] * len(extra)
    if len(data) == 0:
        return None
    data = to_sft_format(data)
    return data.add_column("weight", weights) if weighted else data


def round_args(args, output_dir: Path, seed: int):
    """The recipe's ``SFTConfig`` for one round (its own output dir and seed; no checkpoints kept)."""
    return dataclasses.replace(args, output_dir=str(output_dir), seed=seed, data_seed=None)


def save_verifier(verifier: Verifier, directory: Path) -> None:
    """The verifier's state after scoring a round (CLUE's centroids), if it keeps one."""
    state = verifier.state_dict()
    if state:
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, directory / "verifier_state.pt")


def load_verifier(verifier: Verifier, directory: Path) -> None:
    """Restore the state :func:`save_verifier` wrote for a round that is not scored again (resume)."""
    path = directory / "verifier_state.pt"
    if path.is_file():
        import torch

        verifier.load_state_dict(torch.load(path, weights_only=False))


def finished(directory: Path) -> dict | None:
    marker = directory / "DONE"
    return json.loads(marker.read_text()) if marker.is_file() else None


def mark_done(directory: Path, metrics: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "DONE.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(directory / "DONE")  # atomic: a killed run never leaves a half-written marker


def saved_samples(directory: Path) -> Dataset | None:
    path = directory / "samples"
    return load_from_disk(str(path)) if (path / "dataset_info.json").is_file() else None


def save_samples(samples: Dataset, directory: Path) -> None:
    samples.save_to_disk(str(directory / "samples"))
