"""A-LoL: offline advantage-weighted policy gradients on fixed (prompt, response) data.

"Improving Language Models with Advantage-based Offline Policy Gradients" (docs/METHODS.md §7).
The reference policy ``pi_ref`` is the starting model, frozen. Once, before training
(:mod:`trainers.alol_precompute`), every training pair gets its reward ``R``, the value ``V(x)`` of
its prompt (a small head on ``pi_ref``'s prompt hidden states, :mod:`trainers.value_head`), its advantage
``A = R - V(x)`` and ``pi_ref``'s per-token log-probs; all of it is cached on disk. Training then
holds the policy only, draws the rows with ``A > 0`` with probability ``∝ A``
(:class:`AdvantageSampler`) and minimises one of the losses of :func:`alol_loss`. The policy's prompt
layout and the reference's stop rule are in :mod:`trainers.alol_dialogue`.

:class:`ALoLTrainer` is a ``trl.SFTTrainer``: TRL tokenises the pairs and its fused LM head gives
the policy's per-token log-probs without a ``(batch, length, vocab)`` tensor. Overridden:
``_set_signature_columns_if_needed`` (keep our columns), ``_get_train_sampler`` (the advantage
sampler) and ``compute_loss`` (the A-LoL loss); each calls ``super()`` or the TRL forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from trl import SFTConfig, SFTTrainer

from .alol_dialogue import format_prompt
from .alol_precompute import limit_lengths, precompute
from .card import ModelCardMixin, card_paper
from .value_head import ValueHead

logger = logging.getLogger("intrinsic")

VARIANTS = ("nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_seq", "a_lol_ref_free", "a_lol_kl")
"""Loss variants of :func:`alol_loss` (docs/METHODS.md §7)."""

COLUMNS = ("alol_reward", "alol_advantage", "alol_ref_logps")
"""Columns the precompute adds to the tokenised training rows (and the collator batches)."""


# ------------------------------------------------------------------------------------------------
# The loss: a pure function over tensors
# ------------------------------------------------------------------------------------------------


def _reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sequence ``sum_t m_t v_t`` or ``sum_t m_t v_t / sum_t m_t``; masked entries never leak (even NaN/inf)."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).clamp(min=1)


def alol_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    reward: torch.Tensor | None = None,
    advantage: torch.Tensor | None = None,
    *,
    variant: str = "a_lol",
    epsilon: float = 0.9,
    reduction: Literal["sum", "mean"] = "sum",
    beta: float = 0.1,
    r_gold_floor: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample A-LoL losses and diagnostics.

    With ``l_t = log pi_theta(y_t | x, y_<t)`` (``logps``, differentiable), ``r_t = log pi_ref(y_t | ...)``
    (``ref_logps``), ``m_t`` the completion mask, ``NLL_t = -l_t`` and ``red`` the token reduction
    (``sum``: ``sum_t m_t v_t``; ``mean``: ``sum_t m_t v_t / sum_t m_t``)::

        nll            : red(NLL_t)
        wbc            : R * red(NLL_t)
        r_gold         : R * red(max(exp(l_t), floor) * NLL_t)
        r_lol          : R * w * red(NLL_t),            w   = clip(exp(sum_t m_t (l_t - r_t)))
        a_lol          : A * w * red(NLL_t)
        a_lol_seq      : A * red(w_t * NLL_t),          w_t = clip(exp(l_t - r_t))
        a_lol_ref_free : A * red(NLL_t)
        a_lol_kl       : A * red(NLL_t) + beta * red(l_t - r_t)

    ``clip`` clips to ``[1 - epsilon, 1 + epsilon]`` **in log space** (``exp(clamp(log_ratio,
    log(1-eps), log(1+eps)))``), so a sequence ratio whose probabilities underflow is never
    ``0 / 0``. Every weight (``w``, ``w_t``, ``max(exp(l_t), floor)``, ``R``, ``A``) is detached:
    gradients flow through ``NLL_t`` only (and through ``l_t`` in the ``a_lol_kl`` penalty).

    Args:
        logps: ``(B, T)`` policy log-probs of the completion tokens (any value where ``mask`` is 0).
        mask: ``(B, T)`` bool / 0-1 completion mask.
        ref_logps: ``(B, T)`` reference log-probs (needed by ratio and KL variants).
        reward: ``(B,)`` sequence rewards ``R`` (``wbc``, ``r_gold``, ``r_lol``).
        advantage: ``(B,)`` advantages ``A = R - V(x)`` (``a_lol*``).
        variant: one of :data:`VARIANTS`.
        epsilon: clip range, ``0 < epsilon < 1`` (0.9 in the paper).
        reduction: ``"sum"`` (the paper's ``NLL_theta``) or ``"mean"`` over tokens.
        beta: KL coefficient of ``a_lol_kl``.
        r_gold_floor: the lower bound on the token probability of ``r_gold`` (0.1).

    Returns:
        ``(loss (B,), stats)`` where ``stats`` holds ``weight`` (the importance weight per sample:
        ``w``, or the masked mean of ``w_t``; 1 for variants without a ratio) and ``clipped`` (the
        fraction of the sample's ratios that hit a bound), both detached.

    >>> l = torch.log(torch.tensor([[0.5, 0.25]]))
    >>> loss, _ = alol_loss(l, torch.ones(1, 2, dtype=torch.bool), variant="nll")
    >>> round(float(loss), 4) == round(math.log(8), 4)
    True
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown A-LoL variant {variant!r}; expected one of {VARIANTS}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    mask = mask.bool()
    logps = logps.float()
    nll_t = -logps
    ones = torch.ones(logps.shape[0], device=logps.device)
    stats = {"weight": ones, "clipped": torch.zeros_like(ones)}

    def need(name, value):
        if value is None:
            raise ValueError(f"variant {variant!r} needs {name}")
        return value.to(logps.device).float()

    if variant in ("r_lol", "a_lol", "a_lol_seq", "a_lol_kl"):
        ref = need("ref_logps", ref_logps)
        log_ratio_t = torch.where(mask, logps.detach() - ref, torch.zeros((), device=logps.device))
    low, high = math.log1p(-epsilon), math.log1p(epsilon)

    if variant == "nll":
        loss = _reduce(nll_t, mask, reduction)
    elif variant == "wbc":
        loss = need("reward", reward) * _reduce(nll_t, mask, reduction)
    elif variant == "r_gold":
        floor = logps.detach().exp().clamp(min=r_gold_floor)
        loss = need("reward", reward) * _reduce(floor * nll_t, mask, reduction)
    elif variant in ("r_lol", "a_lol"):
        seq = log_ratio_t.sum(-1)
        weight = seq.clamp(low, high).exp()
        stats = {"weight": weight, "clipped": ((seq < low) | (seq > high)).float()}
        scale = need("reward", reward) if variant == "r_lol" else need("advantage", advantage)
        loss = scale * weight * _reduce(nll_t, mask, reduction)
    elif variant == "a_lol_seq":
        weight_t = log_ratio_t.clamp(low, high).exp()
        clipped_t = ((log_ratio_t < low) | (log_ratio_t > high)).float()
        stats = {"weight": _reduce(weight_t, mask, "mean"), "clipped": _reduce(clipped_t, mask, "mean")}
        loss = need("advantage", advantage) * _reduce(weight_t * nll_t, mask, reduction)
    elif variant == "a_lol_ref_free":
        loss = need("advantage", advantage) * _reduce(nll_t, mask, reduction)
    else:  # a_lol_kl
        kl = _reduce(torch.where(mask, logps - ref, torch.zeros((), device=logps.device)), mask, reduction)
        loss = need("advantage", advantage) * _reduce(nll_t, mask, reduction) + beta * kl
    return loss, {k: v.detach() for k, v in stats.items()}


# ------------------------------------------------------------------------------------------------
# Priority sampling
# ------------------------------------------------------------------------------------------------


class AdvantageSampler(torch.utils.data.Sampler[int]):
    """Draws dataset indices with replacement, ``P(i) ∝ weight_i`` (weights ≤ 0 are never drawn).

    Every process builds the same sampler from the same seed and draws the same global sequence;
    accelerate's ``BatchSamplerShard`` then hands each rank its own batches of it, so the ranks
    train on disjoint draws of one priority sample. ``set_epoch`` changes the draw per epoch.

    >>> s = AdvantageSampler([0.0, 1.0, 3.0], num_samples=4, seed=0)
    >>> len(list(s)), 0 in list(s)
    (4, False)
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_samples: int | None = None, seed: int = 0,
                 uniform: bool = False):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        positive = weights > 0
        if not positive.any():
            raise ValueError("AdvantageSampler: no row has a positive weight (every advantage <= 0?)")
        self.weights = torch.where(positive, torch.ones_like(weights) if uniform else weights, 0.0)
        self.num_samples = int(positive.sum()) if num_samples is None else int(num_samples)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


@dataclass
class ALoLConfig(SFTConfig):
    """``SFTConfig`` plus A-LoL's options (loss variant, sampling, precompute, value head)."""

    variant: str = field(default="a_lol", metadata={"help": f"loss variant, one of {VARIANTS}"})
    epsilon: float = field(default=0.9, metadata={"help": "importance-ratio clip range [1-eps, 1+eps] (log space)"})
    token_reduction: str = field(default="sum", metadata={"help": "sum or mean of the per-token loss of a sample"})
    kl_beta: float = field(default=0.1, metadata={"help": "KL coefficient of a_lol_kl"})
    r_gold_floor: float = field(default=0.1, metadata={"help": "token-probability floor of r_gold"})
    drop_nonpositive: bool = field(default=True, metadata={"help": "a_lol*: drop rows with A <= 0 before sampling"})
    priority_sampling: bool = field(
        default=True, metadata={"help": "a_lol*: sample rows with probability ∝ A (with replacement); else uniformly"}
    )
    scale_steps_by_kept_fraction: bool = field(
        default=True, metadata={"help": "a_lol*: multiply max_steps by the fraction of rows kept (A > 0)"}
    )
    reward_column: str | None = field(default=None, metadata={"help": "dataset column with precomputed rewards"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "keep the last N prompt tokens"})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "keep the first N response tokens, its EOS counted (a cut response has none)"}
    )
    baseline_priority_sampling: bool = field(
        default=False, metadata={"help": "wbc, r_gold, r_lol: sample rows with probability ∝ R (R <= 0 never); else uniformly"}
    )
    prompt_preamble: str | None = field(default=None, metadata={"help": "text put before every (text) prompt the policy sees"})
    prompt_replace: dict[str, str] | None = field(
        default=None, metadata={"help": "substitutions (in order) turning a text prompt into the policy's layout, "
                                        "then stripped (rewards still see the raw prompt)"}
    )
    stop_strings: list[str] | None = field(
        default=None, metadata={"help": "greedy generations (value targets, evaluation) stop at any of these or EOS"}
    )
    response_cut: list[str] | None = field(
        default=None, metadata={"help": "a generated response is cut at the first occurrence of each (in order), "
                                        "stripped and loses a trailing stop string before it is scored"}
    )
    precompute_batch_size: int = field(default=16, metadata={"help": "rows per reference forward in the precompute"})
    reward_batch_size: int = field(default=64, metadata={"help": "rows per reward call in the precompute"})
    alol_cache_dir: str | None = field(
        default=None, metadata={"help": "precompute cache (default: $INTRINSIC_CACHE/alol or ~/.cache/intrinsic/alol)"}
    )
    value_epochs: int = field(default=10, metadata={"help": "value-head training epochs"})
    value_learning_rate: float = field(default=1e-5, metadata={"help": "value-head learning rate"})
    value_batch_size: int = field(default=16, metadata={"help": "value-head batch size"})
    value_val_fraction: float = field(default=0.2, metadata={"help": "share of value prompts held out for its MSE"})
    value_cv_folds: int = field(
        default=0, metadata={"help": "with value_val_fraction 0: k-fold cross-validated MSE of the same recipe, as a "
                                     "diagnostic (the head used is fit on every prompt)"}
    )
    value_head: str = field(default="query", metadata={"help": "pooling: query (one learned query) or mha "
                                                               "(the reference's multi-head attention)"})
    value_num_heads: int = field(default=8, metadata={"help": "heads of the mha value head"})
    value_dropout: float = field(default=0.0, metadata={"help": "value-head dropout (mha: on its input states and pooled vector; "
                                                                 "query: on the pooled vector)"})
    value_select: str = field(
        default="last", metadata={"help": "last epoch, or best: lowest held-out MSE (lowest mean training loss of "
                                          "the epoch when nothing is held out, as the reference)"}
    )
    value_max_new_tokens: int = field(default=128, metadata={"help": "greedy response length on value prompts"})
    max_reward: float = field(default=1.0, metadata={"help": "upper end of the value head's range"})
    min_reward: float = field(default=0.0, metadata={"help": "lower end of the value head's range"})

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.token_reduction not in ("sum", "mean"):
            raise ValueError(f"token_reduction must be 'sum' or 'mean', got {self.token_reduction!r}")
        if self.value_head not in ValueHead.KINDS:
            raise ValueError(f"value_head must be one of {ValueHead.KINDS}, got {self.value_head!r}")
        if self.value_select not in ("last", "best"):
            raise ValueError(f"value_select must be 'last' or 'best', got {self.value_select!r}")
        if not 0 <= self.value_val_fraction < 1:
            raise ValueError(f"value_val_fraction must be in [0, 1), got {self.value_val_fraction}")
        if self.value_cv_folds == 1 or self.value_cv_folds < 0:
            raise ValueError(f"value_cv_folds must be 0 (off) or >= 2, got {self.value_cv_folds}")
        for name in ("max_prompt_length", "max_completion_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.packing or self.padding_free:
            raise ValueError("A-LoL scores one (prompt, response) pair per row: packing/padding_free are not supported")


def _layout_row(row: dict, preamble: str | None, replace: dict[str, str]) -> dict:
    return {"alol_raw_prompt": row["prompt"], "prompt": format_prompt(row["prompt"], preamble, replace)}


class _ALoLCollator:
    """TRL's collator plus our per-row values; reference log-probs padded like the labels."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict]) -> dict:
        extra = {k: [ex.pop(k) for ex in examples] for k in COLUMNS if k in examples[0]}
        batch = self.base(examples)
        if extra:
            batch["alol_reward"] = torch.tensor(extra["alol_reward"], dtype=torch.float32)
            batch["alol_advantage"] = torch.tensor(extra["alol_advantage"], dtype=torch.float32)
            batch["alol_ref_logps"] = torch.cat([torch.as_tensor(r, dtype=torch.float32) for r in extra["alol_ref_logps"]])
        return batch


class ALoLTrainer(ModelCardMixin, SFTTrainer):
    """``SFTTrainer`` for A-LoL: precompute (cached) at init, advantage sampling, the A-LoL loss.

    Args (beyond ``SFTTrainer``'s): ``reward_funcs`` (TRL-protocol callables, e.g. :mod:`rewards`
    classes, summed with ``reward_weights``) unless ``args.reward_column`` names precomputed
    rewards; ``value_dataset`` (rows with a ``prompt`` and the reward's columns: the reference's
    greedy responses to them train the value head; ``None`` sets ``V = 0`` so ``A = R``);
    ``cache_key_extra`` (anything else that should separate caches, e.g. the model's name).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; Trainer divides by GA steps
    _name, _paper = card_paper(["alol"])  # TRL's model card: the method and its citation (trainers/card.py)
    _tag_names = ["trl", "sft", "alol"]

    def __init__(self, *args, reward_funcs: Sequence[Callable] | None = None, reward_weights: Sequence[float] | None = None,
                 value_dataset=None, cache_key_extra: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _ALoLCollator(self.data_collator)
        # the advantage drives sampling for the A-LoL variants only; the baselines (nll, wbc, r_gold, r_lol)
        # see every row uniformly, or (wbc, r_gold, r_lol with baseline_priority_sampling) ∝ R as the HH reference
        self.uses_advantage = self.args.variant.startswith("a_lol")
        self.alol = precompute(self, reward_funcs, reward_weights, value_dataset, cache_key_extra)
        self.train_dataset = self.alol.dataset
        args = self.args
        if self.uses_advantage and args.scale_steps_by_kept_fraction and args.max_steps > 0:
            scaled = max(1, round(args.max_steps * self.alol.kept_fraction))
            logger.info("A-LoL: max_steps %d x kept fraction %.3f -> %d", args.max_steps, self.alol.kept_fraction, scaled)
            args.max_steps = scaled
        self._alol_constants = {
            "alol/kept_fraction": self.alol.kept_fraction, "alol/advantage_mean": self.alol.stats["advantage_mean"],
            "alol/advantage_std": self.alol.stats["advantage_std"], "alol/reward_mean": self.alol.stats["reward_mean"],
        }
        for key in ("value_val_mse", "value_val_mse_of_mean"):
            if self.alol.stats.get(key) is not None:
                self._alol_constants[f"alol/{key}"] = self.alol.stats[key]

    # -- overrides ------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *COLUMNS]))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation with A-LoL's length rule applied *before* TRL's ``max_length`` truncation.

        Text prompts are put into the policy's layout (``prompt_preamble`` / ``prompt_replace``;
        the raw prompt stays in the ``prompt`` column for the rewards). TRL tokenises (appending EOS
        to the response) with ``max_length`` switched off; then :func:`limit_lengths` keeps the last
        ``max_prompt_length`` prompt tokens (a leading BOS kept) and the first
        ``max_completion_length`` response tokens (EOS counted: a cut response has no EOS); TRL's own
        truncation then runs on the limited rows (a safety net: ``max_length`` >= both limits drops nothing).
        """
        from datasets import Dataset

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        columns = dataset.column_names if isinstance(dataset, Dataset) else None
        if columns is None or "input_ids" in columns:  # pre-tokenised rows: the limits first if they carry labels
            if columns is not None and "labels" in columns:
                dataset = limit_lengths(dataset, args.max_prompt_length, args.max_completion_length, tokenizer.bos_token_id)
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        formatted = "prompt" in columns and (args.prompt_preamble is not None or bool(args.prompt_replace))
        if formatted:
            if not isinstance(dataset[0]["prompt"], str):
                raise ValueError("prompt_preamble / prompt_replace format text prompts; these prompts are chat messages")
            dataset = dataset.map(_layout_row, fn_kwargs={"preamble": args.prompt_preamble,
                                                          "replace": dict(args.prompt_replace or {})},
                                  desc="A-LoL prompt layout")
        saved = args.max_length, args.shuffle_dataset
        args.max_length, args.shuffle_dataset = None, False
        try:
            dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        finally:
            args.max_length, args.shuffle_dataset = saved
        dataset = limit_lengths(dataset, args.max_prompt_length, args.max_completion_length, tokenizer.bos_token_id)
        if formatted:
            dataset = dataset.remove_columns("prompt").rename_column("alol_raw_prompt", "prompt")
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _get_train_sampler(self, train_dataset=None):
        if hasattr(self, "alol") and not self.uses_advantage and self.args.baseline_priority_sampling \
                and self.args.variant in ("wbc", "r_gold", "r_lol"):  # the reference's reward-priority sampling
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return AdvantageSampler(self.alol.reward, num_samples=int((self.alol.reward > 0).sum()), seed=seed)
        if not hasattr(self, "alol") or not self.uses_advantage:  # baselines: TRL's own (random) sampler
            return super()._get_train_sampler(train_dataset)
        weights = self.alol.advantage.clone()
        if not self.args.drop_nonpositive:  # keep every row; a priority needs positive weights
            weights = weights - weights.min() + 1e-6 if self.args.priority_sampling else torch.ones_like(weights)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return AdvantageSampler(weights, num_samples=int((weights > 0).sum()), seed=seed,
                                uniform=not self.args.priority_sampling)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "alol_advantage" not in inputs:  # an eval set without precomputed values: TRL's NLL
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        reward, advantage = inputs.pop("alol_reward"), inputs.pop("alol_advantage")
        ref_flat = inputs.pop("alol_ref_logps")
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # TRL's fused head: (B, L-1) log-probs
        mask = outputs.label_mask.bool() if outputs.label_mask is not None else inputs["labels"][:, 1:] != -100
        ref = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, ref_flat.to(mask.device))
        args = self.args
        per_sample, stats = alol_loss(outputs.log_probs, mask, ref, reward, advantage, variant=args.variant,
                                      epsilon=args.epsilon, reduction=args.token_reduction, beta=args.kl_beta,
                                      r_gold_floor=args.r_gold_floor)
        loss = per_sample.mean()
        gathered = self.accelerator.gather_for_metrics(
            torch.stack([stats["weight"].mean(), stats["clipped"].mean(), advantage.to(mask.device).mean(),
                         reward.to(mask.device).mean()])[None]).mean(0).tolist()
        for key, value in zip(("importance_weight", "clip_fraction", "batch_advantage", "batch_reward"), gathered):
            self._metrics[mode][f"alol/{key}"].append(value)
        for key, value in self._alol_constants.items():
            self._metrics[mode][key] = [value]
        if mode == "train" and self.args.include_num_input_tokens_seen == "no":  # else the Trainer counts them
            # in the TrainerState (saved with each checkpoint), so the count continues after a resume
            self.state.num_input_tokens_seen += self.accelerator.gather_for_metrics(
                inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        return (loss, outputs) if return_outputs else loss
