"""RLIF: GRPO whose rewards may read the policy's own internal signals on its completions.

:class:`RLIFTrainer` is a ``trl.GRPOTrainer`` whose reward functions can be
:class:`rewards.InternalReward` instances. Every signal they declare (``logps``, ``entropy``,
``self_certainty``) is computed for the whole generated batch in **one** no-grad pass of the
*current* policy (online, as Intuitor requires), aligned like TRL's per-token log-probs and
temperature-scaled with the sampling temperature:

* when TRL itself runs a no-grad policy pass before scoring (old log-probs, when generation and
  optimisation are misaligned or vLLM importance sampling is on), the signals ride on it: a hook
  on the backbone takes the final hidden states TRL's fused head sees and projects only the
  completion positions through :func:`trainers.signals.token_signals` (chunked; no
  ``(batch, length, vocab)`` tensor);
* otherwise, with HF generation, the same hook keeps the last-position state of each of
  generation's own forwards (one per sampled token; :mod:`trainers.generation_capture`) and the
  same projection reads them after generation: no second forward;
* otherwise (vLLM, a rollout function, tools, FSDP, absolute position embeddings, a capture over
  its memory bound) :meth:`_calculate_rewards` runs that same pass once itself, through TRL's own
  ``_get_per_token_logps_and_entropies`` (same padding, micro-batching, fused head).

Which of the three a run uses is logged once when the trainer is built.

The signals reach rewards as TRL reward kwargs (``token_signals``: one dict of 1-D tensors per
completion, EOS included). Five overrides, each calling ``super()``; no TRL body is copied.

Internal consistency (``ic_hard`` / ``ic_soft`` / ``ic_candidates``, :mod:`rewards.consistency`)
rides on the same pass: the answer tokens of every completion are located right after generation,
forward hooks on the decoder layers the rewards read (:class:`trainers.lens.LogitLens`) keep only
the states at the positions predicting them, and the logit lens reads them out once the group
structure is known (in :meth:`_calculate_rewards`).

Size: the overrides share one per-batch state (:class:`RLIFBatch`) and choose among three routes;
what each route reads lives in :mod:`trainers.generation_capture`, :mod:`trainers.lens`,
:mod:`trainers.clue` and :mod:`trainers.vote`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass, field, fields

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx

from rewards import SIGNALS, InternalReward

from .card import ModelCardMixin
from .clue import HiddenDelta, reasoning_positions
from .completions import CompletionsJsonlMixin
from .generation_capture import StepStates, capture_budget, capture_bytes, rotary_positions, step_mask
from .lens import LogitLens, locate_answers
from .logit_transform import IDENTITY, logit_transform
from .model_parts import is_peft, lm_backbone, unwrap
from .signals import in_vocab_targets, pack_prompt_completion, signal_needs, skip_outside_vocab, token_signals
from .vote import VoteSamplesMixin

logger = logging.getLogger("intrinsic")


@dataclass
class RLIFConfig(GRPOConfig):
    """``GRPOConfig`` plus the options of the internal-signal pass."""

    signal_chunk_size: int | None = field(
        default=None,
        metadata={"help": "tokens per chunk of the signal head projection (null: the device's default, "
                          "512 on CPU, 4096 on CUDA; see trainers/projection.py)"},
    )
    log_signals: bool = field(
        default=True,
        metadata={"help": "log mean self-certainty/entropy every step even if no reward reads them (may add a pass)"},
    )
    ic_fallback_last_k: int | None = field(
        default=4,
        metadata={"help": "internal consistency: tokens read at the end of a completion whose answer does not parse "
                          "(null: none, the completion is skipped)"},
    )
    ic_quantile: float = field(
        default=0.5, metadata={"help": "internal consistency 'candidates' mode: per-layer threshold quantile"}
    )
    vote_samples: int | None = field(
        default=None,
        metadata={"help": "TTRL: completions per prompt that group rewards (majority_vote) vote over; the first "
                          "num_generations of them are trained on (null: the training group votes)"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.vote_samples is not None:  # trainers/vote.py: N >= M, whole groups on every process
            if self.vote_samples < self.num_generations:
                raise ValueError(f"vote_samples ({self.vote_samples}) must be >= num_generations "
                                 f"({self.num_generations}): the trained completions are among the voters")
            local = self.per_device_train_batch_size * self.steps_per_generation
            if groups_split(local, self.num_generations, self.world_size):  # one process: TRL's own check
                raise ValueError(f"vote_samples needs whole groups on every process: per_device_train_batch_size "
                                 f"x steps_per_generation ({local}) must be a multiple of num_generations "
                                 f"({self.num_generations})")


def whole_group_rewards(reward_funcs) -> list[str]:
    """Names of the rewards that must see every completion of a prompt in one call: those declaring
    ``needs_whole_group`` (votes: ``majority_vote``, ``consistency_vote``) and internal consistency in
    ``candidates`` mode (its candidate tokens are the group's answers)."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    return [getattr(f, "__name__", type(f).__name__) for f in funcs
            if getattr(f, "needs_whole_group", False) or "ic_candidates" in (getattr(f, "signals", None) or ())]


def groups_split(rows_per_process: int, num_generations: int, world_size: int) -> bool:
    """Whether TRL's layout can put the completions of one prompt on two processes.

    TRL (``RepeatSampler`` + accelerate's batch sharding) hands each of the ``world_size``
    processes ``rows_per_process`` consecutive rows of the generation batch (training:
    ``per_device_train_batch_size * steps_per_generation``; evaluation: ``per_device_eval_batch_size``),
    in which the ``G = num_generations`` completions of a prompt are consecutive; so every group
    stays on one process iff ``world_size == 1`` or ``rows_per_process % G == 0``.

    >>> groups_split(6, 4, 2), groups_split(8, 4, 2), groups_split(6, 4, 1)
    (True, False, False)
    """
    return world_size > 1 and rows_per_process % num_generations != 0


def group_layout_problem(args: GRPOConfig, reward_funcs, world_size: int | None = None) -> tuple[str, str] | None:
    """``(option, problem)`` when a reward that needs whole groups is configured and ``args`` lets TRL
    split a group over processes (:func:`groups_split`), else ``None``. ``world_size``: ``args.world_size``
    unless given (tests simulate a launch with it)."""
    names = whole_group_rewards(reward_funcs)
    if not names:
        return None
    world = args.world_size if world_size is None else world_size
    layouts = [("per_device_train_batch_size", args.per_device_train_batch_size, args.steps_per_generation,
                args.num_generations)]
    if args.do_eval and args.eval_strategy != "no":
        layouts.append(("per_device_eval_batch_size", args.per_device_eval_batch_size, 1,
                        args.num_generations_eval or args.num_generations))
    for option, batch, steps, group in layouts:
        if groups_split(batch * steps, group, world):
            step = group // math.gcd(group, steps)
            fix = -(-batch // step) * step
            rows = f"{option} x steps_per_generation = {batch} x {steps}" if option.endswith("train_batch_size") \
                else f"{option} = {batch}"
            return option, (f"{', '.join(names)} compare(s) the {group} completions of a prompt, but each of the "
                            f"{world} processes holds {rows} rows, not a multiple of {group}, so a group would be "
                            f"split across processes; set {option}={fix}")
    return None


@dataclass
class RLIFBatch:
    """What :class:`RLIFTrainer` knows of the generation batch being scored: a fresh one per batch
    (``_generate``), filled by the policy pass and read by ``_calculate_rewards``."""

    prompt_ids: list | None = None  # prompt token ids of the generated completions
    signals: dict[str, torch.Tensor] | None = None  # ``(B, C)`` per signal, once a policy pass ran
    signal_parts: list[dict[str, torch.Tensor]] | None = None  # micro-batches' signals, during an armed pass
    completion_length: int | None = None  # ``C`` of the armed pass (TRL's ``logits_to_keep``)
    lens_indices: list | None = None  # per completion: the answer tokens' positions
    lens_found: list | None = None  # per completion: whether its answer parsed
    lens_answer_ids: list | None = None  # per completion: the tokens at those positions
    lens_states: tuple | None = None  # ``(states (K, N, H), counts)`` the lens hooks kept
    delta_spans: list | None = None  # per completion: CLUE's (start, end) positions of its reasoning
    deltas: list | None = None  # per completion: CLUE's ``(K, H)`` hidden-state delta, once a pass ran


RLIF_DEFAULTS = {f.name: f.default for f in fields(RLIFConfig) if f.name not in {g.name for g in fields(GRPOConfig)}}
"""The options :class:`RLIFConfig` adds to ``GRPOConfig``, with their defaults."""


class RLIFTrainer(ModelCardMixin, CompletionsJsonlMixin, VoteSamplesMixin, GRPOTrainer):
    """``GRPOTrainer`` that feeds internal rewards the current policy's per-token signals (and, with
    ``vote_samples``, lets group rewards vote over more completions than it trains on: trainers/vote.py).

    ``args`` may be an :class:`RLIFConfig`, a plain ``GRPOConfig`` or ``None`` (TRL builds a
    ``GRPOConfig``): the RLIF options missing from it take their :class:`RLIFConfig` defaults.
    """

    # configuration, with class-level defaults: every override works before (or without) ``__init__``'s body
    signal_names: tuple[str, ...] = ()
    lens_modes: tuple[str, ...] = ()
    _lens: LogitLens | None = None
    _delta: HiddenDelta | None = None  # CLUE's hidden-state delta (trainers/clue.py), read in the same pass
    _logit_transform = IDENTITY
    _signal_route = "extra_pass"
    _gen_capture: StepStates | None = None  # filled by ``_capture`` during one HF generation
    _gen_taken: tuple | None = None  # (final states, lens states) of the last generation, until ``_generate`` reads them
    _warned: frozenset = frozenset()

    def _option(self, name: str):
        """An RLIF option from ``args``, or its :class:`RLIFConfig` default (``args`` a plain ``GRPOConfig``)."""
        return getattr(self.args, name, RLIF_DEFAULTS[name])

    def __init__(self, *args, **kwargs):
        try:
            given = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        except TypeError:  # a call TRL will refuse with its own message
            given = {}
        self._batch = RLIFBatch()  # per-batch state, replaced by every generation batch
        if given.get("args") is not None and given.get("reward_funcs") is not None:
            self._refuse_split_groups(given["args"], given["reward_funcs"])  # before the model loads
        super().__init__(*args, **kwargs)
        self._refuse_split_groups(self.args, self.reward_funcs)
        needs = signal_needs(self.reward_funcs, self.accelerator.unwrap_model(self.model))
        # all three come out of the same chunked projection, and every step logs them
        self.signal_names = SIGNALS if needs.signals or self._option("log_signals") else ()
        self.lens_modes = needs.lens_modes
        # looked up once: wrappers (DDP, DeepSpeed) keep these module objects inside them
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._policy = unwrap(unwrapped)
        self._peft = unwrapped if is_peft(unwrapped) else None
        self._tuner_layer = None
        self._logit_transform = logit_transform(self._policy)  # Gemma-2 soft-capping, Cohere/Granite scaling
        if self._peft is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layer = next((m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)), None)
        if self.signal_names:
            lm_backbone(self._policy).register_forward_hook(self._capture, with_kwargs=True)
        self._lens: LogitLens | None = None
        if self.lens_modes:  # hooks on the union of the layers the rewards read (``None``: their default)
            self._lens = LogitLens(self._policy, needs.lens_layers, vocab_size=len(self._tokenizer),
                                   tokenizer=self._tokenizer)
        self._delta = HiddenDelta(self._policy, needs.delta_layers) if needs.delta else None
        self._signal_route, why = self.signal_route()
        self._warned = set()
        if self.signal_names or self._lens is not None or self._delta is not None:
            logger.info("RLIF internal signals: %s (%s)", self._signal_route, why)

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _refuse_split_groups(args, reward_funcs) -> None:
        problem = group_layout_problem(args, reward_funcs)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")

    def _policy_adapters_active(self) -> bool:
        """False inside TRL's reference pass on a PEFT model (adapters disabled or the "ref" adapter)."""
        if self._peft is None:
            return True
        if getattr(self._peft, "active_adapter", "default") == "ref":
            return False
        return self._tuner_layer is None or not self._tuner_layer.disable_adapters

    def signal_route(self) -> tuple[str, str]:
        """How a batch's signals are computed, and why: ``"riding"`` on TRL's own no-grad policy pass
        (it runs one before the rewards: old log-probs when generation and optimisation are misaligned,
        or vLLM importance sampling; the condition of TRL 1.16's ``_generate_and_score_completions``),
        ``"generation"`` (read from HF generation's forwards) or ``"extra_pass"`` (our own no-grad pass)."""
        args = self.args
        if args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations) != 0 or (
                self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False)):
            return "riding", "TRL runs a no-grad policy pass before the rewards"
        blockers = [why for why, on in (
            ("vLLM generation", self.use_vllm),
            ("transformers continuous batching", getattr(self, "use_transformers_continuous_batching", False)),
            ("a rollout_func", getattr(self, "rollout_func", None) is not None),
            ("tools", bool(getattr(self, "tools", None))),
            ("a vision-language model", getattr(self, "_is_vlm", False)),
            ("FSDP (the head is sharded after generation)", self.is_fsdp_enabled),
            ("vote_samples", getattr(args, "vote_samples", None) is not None),
            ("CLUE's hidden-state delta (read over prompt and completion)", getattr(self, "_delta", None) is not None),
            ("positions not rotary", not rotary_positions(self._policy)),
            ("INTRINSIC_GENERATION_CAPTURE_MIB=0", capture_budget() <= 0),
        ) if on]
        if blockers:
            return "extra_pass", "no capture during generation: " + ", ".join(blockers)
        return "generation", "captured during HF generation, extra pass only as a fallback"

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _arm_generation(self, prompt_ids, images, multimodal_fields) -> bool:
        """Start capturing generation's states (``signal_route() == "generation"``, within the memory bound)."""
        if self._signal_route != "generation" or not (self.signal_names or self._lens is not None) \
                or images is not None or multimodal_fields or not self._policy_adapters_active():
            return False
        rows = len(prompt_ids)
        steps = getattr(getattr(self, "generation_config", None), "max_new_tokens", None) or self.max_completion_length
        width = max(map(len, prompt_ids), default=0)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        head = self._policy.get_output_embeddings().weight
        layers = bool(self.signal_names) + (len(self._lens.layers) if self._lens is not None else 0)
        size = capture_bytes(rows, steps, int(getattr(head, "ds_shape", head.shape)[-1]), layers,
                             next(self._policy.parameters()).element_size())
        if size > capture_budget():
            self._warn_once(f"RLIF internal signals: extra pass, the generation capture would hold {size / 2**20:.0f} "
                            f"MiB > INTRINSIC_GENERATION_CAPTURE_MIB={capture_budget() / 2**20:.0f}")
            return False
        if self.signal_names:
            self._gen_capture = StepStates(rows, steps, width)
        if self._lens is not None:
            self._lens.arm_generation(rows, steps, width)
        return True

    def _signals_from_generation(self, completion_ids_list: list) -> None:
        """The batch's ``signals`` / ``lens_states`` from the last generation's states (left ``None`` when it failed:
        the extra pass then runs). Per token exactly what the extra pass computes, up to rounding."""
        final, lens_steps = self._gen_taken
        self._gen_taken = None
        captures = ([final] if final is not None else []) + list(lens_steps.values())
        lengths = [len(ids) for ids in completion_ids_list]
        problem = next((c.failed for c in captures if c.failed), None)
        if problem is None and captures and max(lengths, default=0) > min(c.steps for c in captures):
            problem = f"{max(lengths)} generated tokens but {min(c.steps for c in captures)} forwards seen"
        if problem is None and any(c.rows != len(lengths) for c in captures):
            problem = f"{len(lengths)} completions for {captures[0].rows} captured rows"
        if self.accelerator.num_processes > 1:  # every process takes the same path (ZeRO-3 gathers are collective)
            ok = torch.tensor([problem is None], dtype=torch.float32, device=self.accelerator.device)
            if problem is None and self.accelerator.gather(ok).min() < 1:
                problem = "another process could not capture"
            elif problem is not None:
                self.accelerator.gather(ok)
        if problem is not None:
            self._warn_once(f"RLIF internal signals: extra pass for a batch, the generation capture failed ({problem})")
            return
        signals = {}
        if final is not None:
            states = final.states()
            mask = step_mask(lengths, states.shape[1], device=states.device)
            targets = torch.tensor([t for ids in completion_ids_list for t in ids], dtype=torch.long,
                                   device=states.device)
            with self.accelerator.autocast():  # as inside the model's forward, where the extra pass projects
                values = self._head_signals(states[mask], targets)
            signals = {name: torch.full(mask.shape, float("nan"), device=v.device).masked_scatter(mask.to(v.device), v)
                       for name, v in values.items()}
        if self._lens is not None:
            self._batch.lens_states = self._lens.generation_states(lens_steps, self._batch.lens_indices)
        self._batch.signals = signals

    def _capture(self, module, args, kwargs, output):
        """Backbone hook: signals of one micro-batch's completion positions (armed passes only), or
        inside a captured generation the last position's state of each decoding step."""
        if self._gen_capture is not None:
            if not torch.is_grad_enabled():
                self._gen_capture.add(output.last_hidden_state)
            return
        batch = self._batch
        if batch.signal_parts is None or torch.is_grad_enabled():
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        c = batch.completion_length
        hidden = output.last_hidden_state[:, -c - 1 : -1]  # position t-1 predicts completion token t
        batch.signal_parts.append(self._head_signals(hidden, input_ids[:, -c:]))

    def _head_signals(self, hidden: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The signals of final hidden states through the policy's LM head (gathered under ZeRO-3),
        over the tokenizer's rows only (Qwen pads its head past the tokenizer; ids of padding rows are
        clamped here and skipped in ``_calculate_rewards``)."""
        head = self._policy.get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            vocab = len(self._tokenizer) if len(self._tokenizer) < head.weight.shape[0] else None
            return token_signals(hidden, head.weight, in_vocab_targets(targets, vocab), bias=head.bias,
                                 temperature=self.temperature, signals=self.signal_names,
                                 chunk_size=self._option("signal_chunk_size"), vocab_size=vocab,
                                 **self._logit_transform.kwargs())

    # -- overrides (each calls super) -----------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self._gen_taken = None
        armed = self._arm_generation(prompt_ids, images, multimodal_fields)
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        finally:  # the hooks stay registered but stop capturing, whatever happened in generation
            if armed:
                final, self._gen_capture = self._gen_capture, None
                self._gen_taken = (final, self._lens.stop_generation() if self._lens is not None else {})

    def _generate(self, prompts: list):
        self._gen_taken = None
        out = super()._generate(prompts)
        self._batch = batch = RLIFBatch(prompt_ids=out[0])  # a new batch: no signals yet
        if self._lens is not None:  # where each completion's answer is: known before any pass runs
            batch.lens_indices, batch.lens_found, batch.lens_answer_ids = locate_answers(
                self._tokenizer, out[1], self._option("ic_fallback_last_k"))
        if self._delta is not None:
            batch.delta_spans = reasoning_positions(self._tokenizer, out[1])
        if self._gen_taken is not None:
            self._signals_from_generation(out[1])
        return out

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        readers = bool(self.signal_names) or self._lens is not None or self._delta is not None
        batch = self._batch if readers else None
        armed = (batch is not None and batch.signals is None and batch.prompt_ids is not None
                 and not torch.is_grad_enabled() and model is self.model and self._policy_adapters_active())
        if armed:
            batch.signal_parts, batch.completion_length = [] if self.signal_names else None, logits_to_keep
            if self._lens is not None:
                self._lens.arm(batch.lens_indices, logits_to_keep)
            if self._delta is not None:
                self._delta.arm(batch.delta_spans, logits_to_keep)
        try:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                 *args, **kwargs)
        except BaseException:
            if armed and self._lens is not None:
                self._lens.disarm()
            if armed and self._delta is not None:
                self._delta.disarm()
            raise
        finally:
            if armed:
                parts, batch.signal_parts = batch.signal_parts, None
        if armed:
            batch.signals = {name: torch.cat([p[name] for p in parts]) for name in self.signal_names}
            if self._lens is not None:
                batch.lens_states = self._lens.collect()
            if self._delta is not None:
                batch.deltas = self._delta.collect()
        return result

    def _policy_pass(self, completion_ids_list: list) -> None:
        """Run TRL's own no-grad policy pass over the batch when TRL did not (our hook collects)."""
        ids, mask, prompt_length = pack_prompt_completion(self._batch.prompt_ids, completion_ids_list,
                                                          self._tokenizer.pad_token_id, self.pad_to_multiple_of)
        ids, mask = ids.to(self.accelerator.device), mask.to(self.accelerator.device)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        logits_to_keep = ids.shape[1] - prompt_length
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            self._get_per_token_logps_and_entropies(self.model, ids, mask, logits_to_keep, batch_size=batch_size)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if not self.signal_names and self._lens is None and self._delta is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        batch = self._batch
        if batch.signals is None:
            self._policy_pass(completion_ids_list)
        per_completion = [{name: values[i, : len(ids)].cpu() for name, values in batch.signals.items()}
                          for i, ids in enumerate(completion_ids_list)]
        if self.signal_names:
            self._log_signals(per_completion)
        if self._lens is not None:
            lens = self._lens.signals(*batch.lens_states, batch.lens_answer_ids, batch.lens_found, self.lens_modes,
                                      prompts=prompts, quantile=self._option("ic_quantile"))
            batch.lens_states = None  # (K, N, H) rows: freed once read
            for signals, extra in zip(per_completion, lens):
                signals.update(extra)
            self._log_gathered("signals/ic_answer_found", sum(batch.lens_found) / max(len(batch.lens_found), 1))
        if self._delta is not None:
            for signals, d in zip(per_completion, batch.deltas):
                signals.update(hidden_delta=d, hidden_delta_layers=list(self._delta.layers))
            batch.deltas = None
        # padding rows of the head: signals are defined over the tokenizer's tokens only (docs/METHODS.md §6)
        self._log_gathered("signals/outside_vocab",
                           float(skip_outside_vocab(per_completion, completion_ids_list, len(self._tokenizer))))
        for example, signals in zip(inputs, per_completion):
            example["token_signals"] = signals  # TRL passes every extra key to rewards as a list kwarg
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            for example in inputs:
                example.pop("token_signals", None)
        return self._skip_unscorable(rewards)

    # -- rewards with state (CLUE's centroids): saved and restored with each process's RNG state ------

    def _reward_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"reward_state_{self.accelerator.process_index}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        states = {i: f.state_dict() for i, f in enumerate(self.reward_funcs) if isinstance(f, InternalReward)
                  and hasattr(f, "state_dict")}
        if states:
            torch.save(states, self._reward_state_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._reward_state_path(checkpoint)
        if os.path.isfile(path):
            for i, state in torch.load(path, weights_only=False).items():
                self.reward_funcs[int(i)].load_state_dict(state)
        elif any(hasattr(f, "state_dict") for f in self.reward_funcs if isinstance(f, InternalReward)):
            logger.warning("no %s in the checkpoint: rewards with state (clue's centroids) start afresh", path)

    # -- metrics and NaN handling ---------------------------------------------------------------

    def _log_signals(self, per_completion: list[dict]) -> None:
        """``signals/<name>/mean``: mean over completions of each completion's mean (one gather)."""
        mode = "train" if self.model.training else "eval"
        nan = torch.tensor(float("nan"))
        table = torch.stack([torch.stack([s[n].float().mean() if s[n].numel() else nan for n in self.signal_names])
                             for s in per_completion])
        if self.log_completions:  # per completion, columns of TRL's completion table (and completions.jsonl)
            for j, name in enumerate(self.signal_names):
                values = table[:, j].tolist()
                self._log_completion_extra(f"signals/{name}", [v if math.isfinite(v) else None for v in values])
        local = table.nanmean(0).to(self.accelerator.device)
        means = self.accelerator.gather_for_metrics(local[None]).nanmean(0)
        for name, value in zip(self.signal_names, means.tolist()):
            self._metrics[mode][f"signals/{name}/mean"].append(value)

    def _skip_unscorable(self, rewards: torch.Tensor) -> torch.Tensor:
        """A completion whose every weighted reward is NaN gets NaN throughout (advantage 0).

        TRL sums weighted rewards with ``nansum``, so a NaN internal reward next to a weight-0
        logging reward (accuracy) would silently become a reward of 0; we refuse that number.
        """
        weighted = self.reward_weights.to(rewards.device) != 0
        if not weighted.any():
            return rewards
        unscorable = torch.isnan(rewards[:, weighted]).all(dim=1)
        if unscorable.any():
            logger.warning("%d completion(s) without a finite weighted reward: left out of their group", int(unscorable.sum()))
            rewards = rewards.clone()
            rewards[unscorable] = torch.nan
        self._log_gathered("signals/skipped", float(unscorable.sum()))
        return rewards

    def _log_gathered(self, name: str, local_value: float) -> None:
        """Mean over processes of a per-process value, appended to this step's metrics."""
        mode = "train" if self.model.training else "eval"
        value = torch.tensor([local_value], dtype=torch.float32, device=self.accelerator.device)
        self._metrics[mode][name].append(self.accelerator.gather(value).mean().item())
