"""A-LoL's one-time precompute: R, V(x), A = R - V(x) and pi_ref's log-probs, cached on disk.

Runs inside :class:`trainers.alol.ALoLTrainer`'s ``__init__``, after TRL tokenised the training
pairs and before any optimiser step, so the policy *is* the frozen reference here (eval mode, no
grad: no dropout, LoRA adapters exactly as loaded). Steps:

1. (already done by the trainer's dataset preparation, :func:`limit_lengths`: the last
   ``max_prompt_length`` prompt tokens, the first ``max_completion_length`` response tokens, EOS
   counted, before TRL's ``max_length`` truncation);
2. ``R``: a precomputed column, or the weighted sum of reward callables on (prompt, decoded
   response) in batches;
3. value head (:mod:`trainers.value_head`): the reference answers the value prompts greedily
   (``stop_strings``, then ``response_cut``: :func:`trainers.alol_dialogue.greedy_responses`), the
   answers are scored with the same rewards, the head is fit by MSE on the reference's prompt hidden states
   (``value_val_fraction`` held out, or ``value_cv_folds``-fold cross-validation; the MSE is
   reported with the MSE of predicting the mean as a baseline);
4. one reference pass over the training rows: per-token log-probs of the response
   (:func:`trainers.signals.token_signals`, chunked) and ``V(x)`` from the same forward's prompt
   hidden states;
5. ``A = R - V``.

Everything is saved under ``<cache>/alol/<key>/`` where ``key`` hashes the tokenised data, the
model (name, config and a checksum of a few weights), the rewards and every option above; a second
run with the same key loads it and runs no reference forward.

Under several processes (DDP, ZeRO-2/3, FSDP) the work is sharded: each rank scores, answers and
runs the reference over its own slice of the rows (rows sorted by length, dealt round-robin), the
main process fits the value head on the gathered value prompts and broadcasts it, and the
per-row results are all-gathered and merged **once**, so every rank holds the very same ``R``,
``V``, ``A`` and log-probs (checked: the ranks compare a digest and fail if any differs). The main
process writes the cache; a cached run is loaded by the main process and broadcast. Under
ZeRO-3 the model is still partitioned at this point (``zero.Init``, no DeepSpeed engine yet), so
the precompute gathers its parameters for its duration: each rank briefly holds one whole copy of
the weights, as TRL's generation under ZeRO-3 does by default (``ds3_gather_for_generation``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .alol_dialogue import decode_response, greedy_responses
from .distributed import Ranks, merge_shards, whole_parameters
from .logit_transform import logit_transform
from .model_parts import lm_backbone, unwrap
from .signals import token_signals
from .value_head import ValueHead, fit_from_args

logger = logging.getLogger("intrinsic")

CACHE_VERSION = 1


@dataclass
class Precomputed:
    dataset: Dataset  # tokenised rows + alol_reward, alol_advantage, alol_ref_logps
    reward: torch.Tensor
    value: torch.Tensor
    advantage: torch.Tensor
    ref_seq_logps: torch.Tensor
    kept_fraction: float
    stats: dict = field(default_factory=dict)
    path: Path | None = None
    loaded_from_cache: bool = False


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def cache_root(args) -> Path:
    if args.alol_cache_dir:
        return Path(os.path.expanduser(args.alol_cache_dir))
    return Path(os.environ.get("INTRINSIC_CACHE", Path.home() / ".cache" / "intrinsic")) / "alol"


def prompt_length(labels: list[int]) -> int:
    """Index of the first trained token (TRL sets prompt labels to -100)."""
    for i, label in enumerate(labels):
        if label != -100:
            return i
    return len(labels)


def limit_lengths(dataset: Dataset, max_prompt: int | None, max_completion: int | None, bos_id: int | None = None
                  ) -> Dataset:
    """Keep the last ``max_prompt`` prompt tokens (a leading ``bos_id`` stays first and counts) and the
    first ``max_completion`` response tokens, its EOS counted, so a cut response ends without EOS (the
    reference tokenises ``response + EOS`` and truncates it to 128 tokens)."""
    if max_prompt is None and max_completion is None:
        return dataset

    def cut(row):
        ids, labels = row["input_ids"], row["labels"]
        p = prompt_length(labels)
        prompt, completion = ids[:p], ids[p:]
        if max_prompt is not None and len(prompt) > max_prompt:
            bos = [prompt[0]] if bos_id is not None and prompt[0] == bos_id and max_prompt > 1 else []
            prompt = bos + prompt[len(prompt) - (max_prompt - len(bos)) :]
        if max_completion is not None:
            completion = completion[:max_completion]
        return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}

    return dataset.map(cut, desc="A-LoL length limits")


def model_fingerprint(model) -> str:
    """Name, config and a checksum of a few parameters (first, last, every trainable one)."""
    unwrapped = unwrap(model)
    params = list(model.named_parameters())
    chosen = params[:2] + params[-2:] + [p for p in params if p[1].requires_grad and "lora" in p[0]][:8]
    with whole_parameters([p for _, p in chosen]):  # under ZeRO-3 a rank's own slice says nothing
        checksum = [float(p.detach().float().abs().sum()) for _, p in chosen]
    config = unwrapped.config.to_json_string(use_diff=True) if hasattr(unwrapped.config, "to_json_string") else ""
    return json.dumps([getattr(unwrapped.config, "_name_or_path", ""), config, [n for n, _ in chosen], checksum])


def _key(trainer, rewards_id: str, has_value: bool, value_fp: str, extra: str) -> str:
    a = trainer.args
    options = {k: getattr(a, k) for k in ("reward_column", "max_prompt_length", "max_completion_length", "value_epochs",
                                           "value_learning_rate", "value_batch_size", "value_val_fraction",
                                           "value_max_new_tokens", "max_reward", "min_reward", "seed")}
    options.update({k: getattr(a, k) for k in ("value_head", "value_num_heads", "value_dropout", "value_select",
                                               "value_cv_folds", "prompt_preamble", "prompt_replace", "stop_strings",
                                               "response_cut")})
    blob = json.dumps([CACHE_VERSION, trainer.train_dataset._fingerprint, len(trainer.train_dataset),
                       model_fingerprint(trainer.model), rewards_id, has_value, value_fp, options, extra,
                       len(trainer.processing_class)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _unwrap(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    causal = unwrap(model)
    return model, causal


def score(reward_funcs, weights, prompts: list, completions: list[str], columns: dict, batch_size: int) -> torch.Tensor:
    """Weighted sum of TRL-protocol rewards, in batches (a ``None`` score is an error: no silent 0)."""
    total = torch.zeros(len(completions), dtype=torch.float64)
    for func, weight in zip(reward_funcs, weights):
        if weight == 0:
            continue
        values: list = []
        for i in tqdm(range(0, len(completions), batch_size), desc=f"reward {getattr(func, '__name__', func)}", leave=False):
            cols = {k: v[i : i + batch_size] for k, v in columns.items()}
            values.extend(func(prompts=prompts[i : i + batch_size], completions=completions[i : i + batch_size], **cols))
        bad = [j for j, v in enumerate(values) if v is None or not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"reward {getattr(func, '__name__', func)!r} gave no finite value for {len(bad)} row(s), "
                             f"e.g. row {bad[0]}")
        total += weight * torch.tensor(values, dtype=torch.float64)
    return total.float()


def _extra_columns(dataset: Dataset, skip=("input_ids", "labels", "prompt", "completion", "completion_mask",
                                         "seq_lengths", "assistant_masks")) -> dict:
    return {c: list(dataset[c]) for c in dataset.column_names if c not in skip and not c.startswith("alol_")}


def _pad_right(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _hidden(causal, ids, mask):
    return lm_backbone(causal)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


class _Clock:
    """``clock(name)`` records the seconds since the previous call under ``name``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


# ------------------------------------------------------------------------------------------------
# the precompute
# ------------------------------------------------------------------------------------------------


def _value_prompts(trainer, value_dataset: Dataset) -> tuple[list[list[int]], Dataset]:
    """Value prompts tokenised exactly like training prompts (TRL's preparation of an empty response)."""
    def empty(row):  # TRL appends EOS (text) or renders an empty assistant turn (chat): the prompt part is ours
        return {"completion": [{"role": "assistant", "content": ""}] if isinstance(row["prompt"], list) else ""}

    rows = value_dataset.map(empty)
    prepared = trainer._prepare_dataset(rows, trainer.processing_class, trainer.args, False, None, "alol_value")
    prompts = [list(ids[: prompt_length(labels)]) for ids, labels in zip(prepared["input_ids"], prepared["labels"])]
    limit = trainer.args.max_prompt_length
    return [p[len(p) - limit :] if limit and len(p) > limit else p for p in prompts], prepared


def _value_head(trainer, model, causal, reward_funcs, reward_weights, value_dataset, ranks: Ranks, clock):
    """Each rank answers, scores and encodes its share of the value prompts; the main process fits
    the head on all of them and every rank receives it. Returns ``(head, stats)``."""
    args, tokenizer, device = trainer.args, trainer.processing_class, trainer.accelerator.device
    if reward_funcs is None:
        raise ValueError("the value head scores the reference's own answers: it needs reward_funcs "
                         "(a reward_column alone cannot score new responses)")
    prompt_ids, prepared = value_dataset
    mine = ranks.shard(sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])))
    prompts = [prompt_ids[i] for i in mine]
    answers, _ = greedy_responses(model, tokenizer, prompts, args, args.value_max_new_tokens,
                                  args.precompute_batch_size, desc="A-LoL value: greedy answers")
    columns = {k: [v[i] for i in mine] for k, v in _extra_columns(prepared).items()}
    targets = score(reward_funcs, reward_weights, [prepared["prompt"][i] for i in mine], answers, columns,
                    args.reward_batch_size)
    hidden = []
    for i in range(0, len(prompts), args.precompute_batch_size):
        ids, mask = _pad_right(prompts[i : i + args.precompute_batch_size], tokenizer.pad_token_id)
        states = _hidden(causal, ids.to(device), mask.to(device)).cpu()
        hidden.extend(states[j, : int(mask[j].sum())] for j in range(len(states)))
    clock("value_answers")
    parts = ranks.gather_to_main((mine, list(zip(targets.tolist(), hidden))))
    state = None
    if ranks.main:
        rows = merge_shards(parts, len(prompt_ids))
        head, stats = fit_from_args(args, [h for _, h in rows], torch.tensor([t for t, _ in rows]), device)
        state = ({k: v.cpu() for k, v in head.state_dict().items()}, stats)
    state, stats = ranks.broadcast(state)
    clock("value_fit")  # gather, fit on the main process, broadcast
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the RNG alone
        head = ValueHead.from_args(args, state["query"].shape[0])
    head.load_state_dict(state)
    return head.to(device).eval(), stats


@torch.no_grad()
def _compute(trainer, dataset: Dataset, reward_funcs, reward_weights, value_dataset, ranks: Ranks) -> dict:
    """This rank's share of rewards, value-prompt work and reference pass; merged over ranks at the end."""
    args, tokenizer = trainer.args, trainer.processing_class
    model, causal = _unwrap(trainer)
    was_training = model.training
    model.eval()
    device = trainer.accelerator.device
    stats: dict = {}
    prompt_lens = [prompt_length(labels) for labels in dataset["labels"]]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    mine = ranks.shard(sorted(range(len(lengths)), key=lengths.__getitem__))  # similar lengths: less padding
    try:
        clock = _Clock()
        # 2. rewards
        if args.reward_column:
            if args.reward_column not in dataset.column_names:
                raise ValueError(f"reward_column {args.reward_column!r} not in the training data ({dataset.column_names})")
            reward = [float(r) for r in dataset.select(mine)[args.reward_column]] if mine else []
        else:
            rows = dataset.select(mine)
            texts = [decode_response(tokenizer, ids[prompt_lens[i]:]) for i, ids in zip(mine, rows["input_ids"])]
            reward = score(reward_funcs, reward_weights, list(rows["prompt"]), texts, _extra_columns(rows),
                           args.reward_batch_size).tolist()
        clock("rewards")
        # 3. value head
        head = None
        if value_dataset is not None:
            head, head_stats = _value_head(trainer, model, causal, reward_funcs, reward_weights, value_dataset, ranks,
                                           clock)
            stats.update(head_stats)
        # 4. reference pass
        lm_head = causal.get_output_embeddings()
        transform = logit_transform(causal)  # the model's own distribution (Gemma-2 soft-capping, Granite scaling)
        ref_token, value = [], []
        for start in tqdm(range(0, len(mine), args.precompute_batch_size), desc="A-LoL reference pass", leave=False,
                          disable=not ranks.main):
            rows = mine[start : start + args.precompute_batch_size]
            ids, mask = _pad_right(dataset[rows]["input_ids"], tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            hidden = _hidden(causal, ids, mask)
            p = torch.tensor([prompt_lens[i] for i in rows], device=device)
            pos = torch.arange(ids.shape[1], device=device)
            target_mask = (pos[None, 1:] >= p[:, None]) & mask[:, 1:].bool()  # position t-1 predicts token t
            logps = token_signals(hidden[:, :-1][target_mask], lm_head.weight, ids[:, 1:][target_mask],
                                  bias=lm_head.bias, signals=("logps",), **transform.kwargs())["logps"].cpu()
            ref_token.extend(logps.split(target_mask.sum(1).tolist()))
            if head is not None:
                prompt_mask = (pos[None, :] < p[:, None]) & mask.bool()
                value.extend(head(hidden.float(), prompt_mask).cpu().tolist())
            else:
                value.extend([0.0] * len(rows))
    finally:
        model.train(was_training)
    clock("reference_pass")
    ranks.wait()
    clock("wait_for_ranks")
    # the one merge: every rank gets every row's values, computed once by exactly one rank
    flat = torch.cat(ref_token) if ref_token else torch.zeros(0)  # one tensor pickles far faster than many
    parts = ranks.all_gather((mine, reward, value, flat, [len(t) for t in ref_token]))
    merged = merge_shards([(rows, list(zip(r, v, f.split(n)))) for rows, r, v, f, n in parts], len(dataset))
    clock("merge")
    ref_token = [t for _, _, t in merged]
    stats.update(precompute_processes=ranks.world, rows_per_process=[len(part[0]) for part in parts],
                 precompute_phase_seconds=clock.seconds)  # the main process's
    return {"reward": torch.tensor([r for r, _, _ in merged], dtype=torch.float32),
            "value": torch.tensor([v for _, v, _ in merged], dtype=torch.float32), "ref_token_logps": ref_token,
            "ref_seq_logps": torch.stack([t.sum() for t in ref_token]), "stats": stats}


def digest(*tensors: torch.Tensor) -> str:
    """A hash of the exact bytes of ``tensors`` (to check that every rank holds the same values)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(trainer, dataset: Dataset, data: dict, path: Path | None, loaded: bool, ranks: Ranks) -> Precomputed:
    args = trainer.args
    reward, value = data["reward"], data["value"]
    advantage = reward - value
    kept = advantage > 0 if args.drop_nonpositive else torch.ones_like(advantage, dtype=torch.bool)
    dataset = dataset.add_column("alol_reward", reward.tolist()).add_column("alol_advantage", advantage.tolist())
    dataset = dataset.add_column("alol_ref_logps", [t.tolist() for t in data["ref_token_logps"]])
    stats = dict(data["stats"])
    stats.update({"rows": len(dataset), "kept_rows": int(kept.sum()), "kept_fraction": float(kept.float().mean()),
                  "reward_mean": float(reward.mean()), "value_mean": float(value.mean()),
                  "advantage_mean": float(advantage.mean()), "advantage_std": float(advantage.std()) if len(advantage) > 1 else 0.0,
                  "advantage_kept_mean": float(advantage[kept].mean()) if kept.any() else float("nan"),
                  "loaded_from_cache": loaded,
                  "digest": digest(reward, value, advantage, data["ref_seq_logps"])})
    digests = ranks.all_gather(stats["digest"])
    if len(set(digests)) > 1:
        raise RuntimeError(f"A-LoL precompute: the ranks hold different advantages (digests {digests})")
    if not kept.any():
        raise ValueError("A-LoL: no training row has a positive advantage (R <= V(x) everywhere); nothing to train on")
    if ranks.main:
        logger.info("A-LoL precompute%s: %s", " (cached)" if loaded else "", json.dumps(stats))
    return Precomputed(dataset=dataset, reward=reward, value=value, advantage=advantage, ref_seq_logps=data["ref_seq_logps"],
                       kept_fraction=stats["kept_fraction"], stats=stats, path=path, loaded_from_cache=loaded)


def precompute(trainer, reward_funcs, reward_weights, value_dataset, extra: str = "") -> Precomputed:
    """Rewards, value head, advantages and reference log-probs for ``trainer.train_dataset`` (cached)."""
    args = trainer.args
    if reward_funcs is None and not args.reward_column:
        raise ValueError("A-LoL needs rewards: pass reward_funcs or set reward_column")
    if reward_funcs is not None:
        reward_funcs = list(reward_funcs)
        reward_weights = [1.0] * len(reward_funcs) if reward_weights is None else list(reward_weights)
        if len(reward_weights) != len(reward_funcs):
            raise ValueError(f"{len(reward_funcs)} reward functions but {len(reward_weights)} weights")
    dataset = trainer.train_dataset
    rewards_id = repr([(repr(f), w) for f, w in zip(reward_funcs or [], reward_weights or [])])
    value_fp = "" if value_dataset is None else f"{value_dataset._fingerprint}:{len(value_dataset)}"
    key = _key(trainer, rewards_id, value_dataset is not None, value_fp, extra)  # on every rank: may gather (ZeRO-3)
    if value_dataset is not None:  # on every rank: TRL's preparation runs collectives (main-first barriers)
        value_dataset = _value_prompts(trainer, value_dataset)
    ranks = Ranks(trainer.accelerator)
    path = cache_root(args) / ranks.broadcast(key) / "precompute.pt"  # the main process's key names the cache
    data = torch.load(path, weights_only=False) if ranks.main and path.exists() else None
    if ranks.broadcast(data is not None):  # cached: the main process's copy, sent to every rank
        return _finish(trainer, dataset, ranks.broadcast(data), path, True, ranks)
    model, _ = _unwrap(trainer)
    start = time.perf_counter()
    with whole_parameters(list(model.parameters())):
        data = _compute(trainer, dataset, reward_funcs, reward_weights, value_dataset, ranks)
    data["stats"]["precompute_seconds"] = round(time.perf_counter() - start, 3)  # the slowest rank's, merge included
    if ranks.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        tmp.replace(path)
        (path.parent / "stats.json").write_text(json.dumps(data["stats"], indent=2))
    return _finish(trainer, dataset, data, path, False, ranks)
