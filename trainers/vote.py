"""TTRL's vote over more completions than are trained on: ``vote_samples`` N per prompt vote, M train.

TTRL (Zuo et al.) samples N = 64 completions per test problem, takes the plurality answer of all 64
as the pseudo-label, rewards each completion 1 if its answer equals the label, and trains on M = 32
of them (the first 32 of the 64: ``verl/trainer/ppo/ray_trainer.py::_select_top_k_per_prompt`` in
PRIME-RL/TTRL). :class:`VoteSamplesMixin` does this inside TRL's ``GRPOTrainer`` with two overrides,
each calling ``super()``:

* :meth:`_generate_single_turn` asks TRL's own generation backend (vLLM server or colocated, or
  ``generate``) for N completions of every training prompt in one call and hands TRL the first M of
  each group; the other N - M are kept aside;
* :meth:`_calculate_rewards` runs TRL's reward computation over all N of every group (so a group
  reward such as ``majority_vote`` votes over N), logs TTRL's metrics, and returns the rows of the
  M trained completions, in TRL's layout (process-major, groups of M).

``num_generations`` stays the training group size M (advantages are normalised over the M, as in
TTRL, whose GRPO advantage is computed after the selection). Every process must hold whole groups:
``per_device_train_batch_size * steps_per_generation`` a multiple of ``num_generations``.

Metrics (every generation batch, over all groups of all processes, N completions each):
``ttrl/majority_ratio`` (share of a group's N answers in the plurality cluster = mean
``majority_vote`` reward over the N), ``ttrl/label_accuracy`` (whether the plurality answer is
correct: the gold accuracy of a completion that holds it; 0 when nothing parses; logged when
``math_accuracy`` is among the rewards) and ``ttrl/reward_accuracy`` (share of the N whose vote
reward equals their gold reward).
"""

from __future__ import annotations

import torch
from trl.data_utils import is_conversational

from rewards import InternalReward, MajorityVote, MathAccuracy


def select_trained(rewards: torch.Tensor, vote_samples: int, trained: int) -> torch.Tensor:
    """Rows of the trained completions from a reward table laid out in groups of ``vote_samples``.

    ``rewards``: ``(groups * vote_samples, F)``, each group's trained completions first. Returns
    ``(groups * trained, F)``.

    >>> select_trained(torch.arange(8.0)[:, None], vote_samples=4, trained=2).flatten().tolist()
    [0.0, 1.0, 4.0, 5.0]
    """
    features = rewards.shape[1]
    return rewards.view(-1, vote_samples, features)[:, :trained].reshape(-1, features)


def ttrl_metrics(vote: torch.Tensor, gold: torch.Tensor | None) -> dict[str, float]:
    """TTRL's per-batch metrics from ``(groups, N)`` tables of vote rewards and (optional) gold rewards.

    A completion's vote reward is 1 when its answer is its group's plurality answer, so the
    plurality share is the mean vote reward, and the label is right when a completion holding it is.

    >>> vote = torch.tensor([[1., 1., 0., 0.], [0., 0., 0., 0.]])
    >>> gold = torch.tensor([[1., 1., 0., 1.], [0., 0., 0., 0.]])
    >>> ttrl_metrics(vote, gold)
    {'ttrl/majority_ratio': 0.25, 'ttrl/label_accuracy': 0.5, 'ttrl/reward_accuracy': 0.875}
    """
    out = {"ttrl/majority_ratio": torch.nan_to_num(vote, nan=0.0).mean().item()}
    if gold is None or torch.isnan(gold).all():
        return out
    voted = vote == 1
    first = voted.float().argmax(dim=1)  # a completion holding the label (any: they share one answer)
    label_correct = torch.where(voted.any(dim=1), gold.gather(1, first[:, None]).squeeze(1) == 1,
                                torch.zeros_like(voted[:, 0]))
    out["ttrl/label_accuracy"] = label_correct.float().mean().item()
    out["ttrl/reward_accuracy"] = (vote == gold).float().mean().item()
    return out


class VoteSamplesMixin:
    """Put before ``GRPOTrainer`` in the bases; active when ``args.vote_samples`` > ``num_generations``."""

    #: per-completion reward kwargs a subclass attaches to inputs (left empty on the vote-only rows)
    per_completion_keys: tuple[str, ...] = ("token_signals",)
    _vote_extra: list | None = None  # per-batch state (class default: overrides work before __init__'s body)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._vote_extra: list | None = None
        if not self._voting():
            return
        internal = [f.name for f in self.reward_funcs if isinstance(f, InternalReward)]
        if internal:
            raise ValueError(f"vote_samples: internal rewards {internal} read the policy on trained completions "
                             "only; use text rewards (majority_vote, math_accuracy) with vote_samples")
        if self.tools or self.rollout_func is not None:
            raise ValueError("vote_samples: not supported with tools or a rollout_func")

    def _voting(self) -> bool:
        n = getattr(self.args, "vote_samples", None)
        return n is not None and n > self.num_generations

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not (self._voting() and self.model.training):
            self._vote_extra = None
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if images is not None or multimodal_fields:
            raise NotImplementedError("vote_samples: multimodal prompts are not supported")
        n, m = self.args.vote_samples, num_generations
        if len(prompt_ids) % m:
            raise ValueError(f"vote_samples: {len(prompt_ids)} local prompts are not whole groups of {m}")
        groups = len(prompt_ids) // m
        for g in range(groups):
            if any(list(prompt_ids[g * m + j]) != list(prompt_ids[g * m]) for j in range(1, m)):
                raise ValueError("vote_samples: a local group of num_generations rows holds different prompts")
        expanded = [prompt_ids[g * m] for g in range(groups) for _ in range(n)]
        completion_ids, logprobs = super()._generate_single_turn(expanded, None, multimodal_fields, n,
                                                                 has_tool_images)
        keep = [g * n + j for g in range(groups) for j in range(m)]
        self._vote_extra = [[completion_ids[g * n + j] for j in range(m, n)] for g in range(groups)]
        return [completion_ids[i] for i in keep], None if logprobs is None else [logprobs[i] for i in keep]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        extra, self._vote_extra = self._vote_extra, None
        if extra is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        n, m = self.args.vote_samples, self.num_generations
        texts = iter(self.processing_class.batch_decode([ids for group in extra for ids in group],
                                                        skip_special_tokens=True))
        chat = is_conversational({"prompt": prompts[0]})
        all_inputs, all_prompts, all_completions, all_ids = [], [], [], []
        for g, group_extra in enumerate(extra):
            rows = range(g * m, (g + 1) * m)
            all_inputs += [inputs[i] for i in rows]
            all_prompts += [prompts[i] for i in rows]
            all_completions += [completions[i] for i in rows]
            all_ids += [completion_ids_list[i] for i in rows]
            first = {k: (None if k in self.per_completion_keys else v) for k, v in inputs[g * m].items()}
            for ids in group_extra:
                text = next(texts)
                all_inputs.append(dict(first))
                all_prompts.append(prompts[g * m])
                all_completions.append([{"role": "assistant", "content": text}] if chat else text)
                all_ids.append(ids)
        logged = {column: len(values) for column, values in self._pending_extra_logs.items()}
        rewards = super()._calculate_rewards(all_inputs, all_prompts, all_completions, all_ids)  # gathered
        self._keep_trained_columns(logged, len(extra))
        self._log_ttrl(rewards.view(-1, n, rewards.shape[1]))
        return select_trained(rewards, n, m)

    def _keep_trained_columns(self, logged: dict[str, int], groups: int) -> None:
        """Completion-table columns the rewards logged (TRL's ``log_extra``) over all N of every group:
        the rows of the M trained completions (the table's other columns hold those only)."""
        n, m = self.args.vote_samples, self.num_generations
        for column, values in self._pending_extra_logs.items():
            new = values[logged.get(column, 0):]
            if len(new) == groups * n:
                values[logged.get(column, 0):] = [new[g * n + j] for g in range(groups) for j in range(m)]

    def _log_ttrl(self, grouped: torch.Tensor) -> None:
        """TTRL's metrics from the gathered ``(groups, N, F)`` reward table."""
        vote = next((i for i, f in enumerate(self.reward_funcs) if isinstance(f, MajorityVote)), None)
        if vote is None:
            return
        gold = next((i for i, f in enumerate(self.reward_funcs) if isinstance(f, MathAccuracy)), None)
        metrics = ttrl_metrics(grouped[:, :, vote], None if gold is None else grouped[:, :, gold])
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
