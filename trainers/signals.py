"""Per-token internal signals of a causal LM, computed without a ``(batch, length, vocab)`` tensor.

Notation (docs/METHODS.md): ``h_t`` is the final hidden state at the position that *predicts*
completion token ``y_t``, ``W`` (``V x H``) and ``b`` the LM head, ``T`` the sampling temperature,
``z_t = (W h_t + b) / T`` the temperature-scaled logits, ``p_t = softmax(z_t)``.

=================  ===================================================================
signal             per-token value
=================  ===================================================================
``logps``          ``log p_t[y_t] = z_t[y_t] - logsumexp(z_t)``
``entropy``        ``H(p_t) = logsumexp(z_t) - sum_j p_t[j] z_t[j]``
``self_certainty`` ``KL(U || p_t) = logsumexp(z_t) - mean_j z_t[j] - log V``  (>= 0)
=================  ===================================================================

How it is computed (why we build on TRL)
----------------------------------------
TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, behind
``GRPOTrainer._get_per_token_logps_and_entropies``) projects ``hidden @ W.T`` in ``[tokens,
vocab_chunk]`` tiles and folds every tile into running online-logsumexp statistics
(``trl.kernels.chunked_logprob``: a Triton kernel on CUDA/XPU, the same fold as torch ops
elsewhere). We call that fold on our own tiles rather than re-implementing it, so our numbers come
from the code that computes TRL's training log-probs. The tiles are ours
(:func:`trainers.projection.project`) because TRL's forward stores a bf16 model's tile in bf16;
ours is always fp32 (see Precision). The fold gives ``logsumexp(z)``, ``z[y]``, the entropy terms
and ``sum_j z_j`` in one pass over V, so every signal costs one GEMM per tile.

On top of the vocabulary tiling we chunk the *flattened tokens* (``B * L``), so the caller bounds
the tile: peak extra memory is about ``k * chunk_size * min(vocab_chunk_size, V) * 4`` bytes
(``k`` = 1 with Triton, a few on the CPU fallback, which materialises tile-sized temporaries),
plus ``vocab_chunk_size * H * 4`` bytes for an fp32 copy of one head slice off CUDA when the head
is not fp32. Defaults are per device (:data:`trainers.projection.CHUNKS`: 512 tokens x 4096 rows on
CPU, 4096 x 8192 on CUDA). With ``vocab_chunk_size=None`` the tile spans the whole vocabulary.
``benchmarks/signal_memory.py`` measures the peak against full fp32 logits (its figures: README).

Precision: the GEMM runs at the model's precision with an fp32 tile (bf16/fp16 head or
low-precision autocast: operands in that dtype, fp32 accumulation and output, a tensor-core GEMM
on CUDA; fp32 head: exact fp32), and every reduction runs in fp32
(:mod:`trainers.projection`). Against a float64 reference: relative error of entropy and
self-certainty <= 2e-3 with bf16 inputs, <= 1e-5 with fp32 inputs (tests/test_signals.py). These
are reward / diagnostic signals: :func:`token_signals` runs under ``torch.no_grad()`` and never
builds a graph. (Use TRL's fused head for differentiable log-probs and entropy.)

Logit transforms: ``logit_scale`` and ``final_logit_softcapping`` apply the transform some
architectures put after the head (Gemma-2 soft-capping, Cohere/Granite scaling);
:func:`trainers.logit_transform.logit_transform` reads them from a model's config, and every
caller in this package passes them.

Vocabulary restriction: Qwen pads its LM head beyond the tokenizer (151,936 rows for 151,665
tokens). ``vocab_size=V'`` keeps only the first ``V'`` rows of ``W`` (and of ``b``): the softmax,
the entropy, the mean logit and ``log V`` all use ``V'`` (so self-certainty stays a true KL to the
uniform distribution over the ``V'`` real tokens). Targets must lie in ``[0, V')``. ``None``
(default) uses every row, which is the distribution TRL's log-probs are computed under.

ZeRO-3 / FSDP: pass a gathered, full weight (e.g. inside ``trl.trainer.utils.maybe_gather_lm_head_ctx``).

Alignment: a causal LM's position ``i`` predicts token ``i + 1``. For TRL's batches
(``input_ids = cat([prompt_ids, completion_ids], 1)``, prompts left-padded to a common length ``P``,
completions right-padded to ``C``), the rows predicting the completion are
``hidden[:, P - 1 : P - 1 + C]``; see :func:`completion_hidden_states`.

Example::

    >>> import torch
    >>> h, W = torch.randn(2, 5, 16), torch.randn(50, 16)
    >>> y = torch.randint(0, 50, (2, 5))
    >>> out = token_signals(h, W, y, temperature=0.9, signals=("self_certainty", "entropy"))
    >>> sorted(out), out["self_certainty"].shape
    (['entropy', 'self_certainty'], torch.Size([2, 5]))
    >>> bool((out["self_certainty"] >= -1e-5).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rewards import LENS_SIGNALS, SIGNALS, InternalReward, default_layers

from .clue import HiddenDelta, reasoning_positions
from .lens import LogitLens, agreement, group_candidates, lens_modules, locate_answers, per_completion
from .logit_transform import LogitTransform, logit_transform
from .model_parts import lm_backbone, unwrap
from .projection import compute_dtype, default_chunks, project

__all__ = [
    "SIGNALS",
    "Needs",
    "completion_hidden_states",
    "completion_signals",
    "in_vocab_targets",
    "masked_mean",
    "outside_vocab",
    "pack_prompt_completion",
    "signal_needs",
    "skip_outside_vocab",
    "token_signal_dicts",
    "token_signals",
]

def _trl_fold():
    """TRL's tile fold (Triton kernel on CUDA/XPU, torch ops elsewhere): the reduction behind its fused LM head."""
    try:
        from trl.kernels import chunked_logprob as kernels

        return kernels._forward_kernel, kernels._forward_tile, kernels._use_triton, kernels._BLOCK_SIZE
    except (ImportError, AttributeError) as err:  # pragma: no cover - depends on the installed TRL
        raise ImportError(
            "trainers.signals needs trl.kernels.chunked_logprob's tile fold; install the TRL pyproject.toml pins."
        ) from err


def _fold_tiles(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                dtype: torch.dtype, temperature: float, tile_cols: int, transform: LogitTransform, entropy: bool,
                mean_logits: bool) -> dict[str, torch.Tensor]:
    """Online-logsumexp statistics of ``z = transform(h W^T + b) / T`` over all rows of ``weight``, one tile at a time.

    Each ``(n, tile_cols)`` fp32 tile comes from :func:`trainers.projection.project` (GEMM in ``dtype``,
    fp32 output) and is folded by TRL's kernel into fp32 running statistics: ``log_z = logsumexp(z)``,
    ``target_logit = z[y]``, ``sum_exp``/``x_sum_exp`` (``sum e^(z - m)`` and ``sum e^(z - m) z``) and
    ``z_sum = sum_j z_j``.
    """
    kernel, torch_fold, use_triton, block = _trl_fold()
    n, vocab, device = hidden.shape[0], weight.shape[0], weight.device
    stats = {name: torch.zeros(n, device=device, dtype=torch.float32)
             for name in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "target_logit")}
    running_max = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
    max_before_target = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
    h = hidden.to(device=device, dtype=dtype)
    y = targets.contiguous()
    buffer = torch.empty(n * min(tile_cols, vocab), device=device, dtype=torch.float32)
    fold = kernel[(n,)] if use_triton(device) else torch_fold
    for v0 in range(0, vocab, tile_cols):
        v1 = min(v0 + tile_cols, vocab)
        out = buffer[: n * (v1 - v0)].view(n, v1 - v0)  # contiguous, also for the narrower last tile
        tile = project(h, weight[v0:v1], None if bias is None else bias[v0:v1], dtype=dtype, out=out)
        fold(tile, tile.stride(0), y, running_max, stats["sum_exp"], stats["x_sum_exp"], stats["sq_sum_exp"],
             stats["z_sum"], max_before_target, stats["target_logit"], v0, v1 - v0,
             logit_scale=transform.scale, softcap=transform.softcap or 1.0, inv_t=1.0 / temperature,
             HAS_SOFTCAP=transform.softcap is not None, HAS_ENTROPY=entropy, HAS_LOG_SUM_SQ_PROBS=False,
             HAS_MEAN_LOGITS=mean_logits, HAS_IS_TOP1=False, BLOCK_SIZE=block)
    stats["log_z"] = running_max + stats["sum_exp"].log()
    return stats


@torch.no_grad()
def token_signals(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    signals: Sequence[str] = SIGNALS,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None | str = "auto",
    vocab_size: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token ``logps`` / ``entropy`` / ``self_certainty`` from hidden states and the LM head.

    With ``z = softcap(logit_scale * (W[:V] h + b[:V])) / T`` (softcap only when given) and
    ``p = softmax(z)``::

        logps          = z[y] - logsumexp(z)
        entropy        = logsumexp(z) - sum_j p_j z_j
        self_certainty = logsumexp(z) - mean_j z_j - log V        (= KL(U_V || p))

    Args:
        hidden: ``(..., H)`` hidden states, already aligned (row ``t`` predicts ``targets[..., t]``);
            any float dtype, any leading shape.
        weight: ``(V_head, H)`` LM-head weight (full, not sharded).
        targets: ``(...)`` integer token ids, same leading shape as ``hidden``, in ``[0, V)``.
            Fill padding positions with any valid id (e.g. the pad id) and mask them afterwards.
        bias: optional ``(V_head,)`` LM-head bias.
        temperature: ``T > 0``; the sampling temperature (TRL's ``args.temperature``).
        signals: which of :data:`SIGNALS` to return.
        chunk_size: tokens (of the flattened ``B * L``) per chunk; ``None``: the device's default
            (:func:`trainers.projection.default_chunks`: 512 on CPU, 4096 on CUDA).
        vocab_chunk_size: vocabulary rows per projection tile; ``None`` for the whole vocabulary;
            ``"auto"``: the device's default (4096 on CPU, 8192 on CUDA).
        vocab_size: use only the first ``vocab_size`` rows of the head (``V = vocab_size``, also in
            ``log V``); ``None`` for all ``V_head`` rows.
        logit_scale: multiplier applied to the raw logits (e.g. Cohere/Granite configs); 1 otherwise.
        final_logit_softcapping: ``c`` for ``c * tanh(z / c)`` soft-capping (e.g. Gemma 2); ``None`` otherwise.

    Returns:
        ``{name: fp32 tensor of shape targets.shape}`` for each requested name.
    """
    wanted = tuple(dict.fromkeys(signals))
    unknown = [name for name in wanted if name not in SIGNALS]
    if unknown or not wanted:
        raise ValueError(f"signals must be a non-empty subset of {SIGNALS}, got {tuple(signals)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (chunk_size is not None and chunk_size < 1) or (isinstance(vocab_chunk_size, int) and vocab_chunk_size < 1):
        raise ValueError(f"chunk sizes must be >= 1, got chunk_size={chunk_size}, vocab_chunk_size={vocab_chunk_size}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    head_rows, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size or hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}; expected hidden (..., H), weight (V, H), targets (...)"
        )
    vocab = head_rows if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= head_rows:
        raise ValueError(f"vocab_size must be in [1, {head_rows}] (rows of the LM head), got {vocab_size}")
    weight = weight[:vocab]
    bias = None if bias is None else bias[:vocab]

    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_targets = targets.reshape(-1).to(device=weight.device, dtype=torch.long)
    n_tokens = flat_targets.numel()
    if n_tokens == 0:
        return {name: torch.zeros(targets.shape, dtype=torch.float32, device=weight.device) for name in wanted}
    low, high = int(flat_targets.min()), int(flat_targets.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"target ids must be in [0, {vocab}) (vocab_size), got ids in [{low}, {high}]")

    need_sc = "self_certainty" in wanted
    need_entropy = "entropy" in wanted
    tokens_default, cols_default = default_chunks(weight.device)
    chunk_size = tokens_default if chunk_size is None else chunk_size
    vocab_chunk_size = cols_default if vocab_chunk_size == "auto" else vocab_chunk_size
    tile_cols = vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
    transform = LogitTransform(logit_scale, final_logit_softcapping)
    dtype = compute_dtype(weight)  # decided before autocast is switched off below
    log_vocab = math.log(vocab)

    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    with torch.autocast(weight.device.type, enabled=False):
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            folded = _fold_tiles(flat_hidden[start:end], weight, bias, flat_targets[start:end], dtype=dtype,
                                 temperature=temperature, tile_cols=tile_cols, transform=transform,
                                 entropy=need_entropy, mean_logits=need_sc)
            log_z = folded["log_z"]
            if "logps" in wanted:
                pieces["logps"].append(folded["target_logit"] - log_z)
            if need_entropy:
                pieces["entropy"].append(log_z - folded["x_sum_exp"] / folded["sum_exp"])
            if need_sc:
                pieces["self_certainty"].append(log_z - folded["z_sum"] / vocab - log_vocab)
    return {name: torch.cat(parts).view(targets.shape) for name, parts in pieces.items()}


def completion_hidden_states(
    hidden: torch.Tensor, prompt_length: int, completion_length: int | None = None
) -> torch.Tensor:
    """Rows of full-sequence hidden states that predict the completion tokens.

    For ``input_ids = cat([prompt_ids, completion_ids], dim=1)`` (TRL: prompts left-padded to ``P``,
    completions right-padded to ``C``), position ``i`` predicts token ``i + 1``, so completion token
    ``t`` (at index ``P + t``) is predicted by ``hidden[:, P - 1 + t]``::

        completion_hidden_states(hidden, P, C) == hidden[:, P - 1 : P - 1 + C]

    This is what TRL keeps with ``logits_to_keep = C`` (``logits[:, -C - 1 : -1]``) when ``P + C`` is
    the full length. ``completion_length=None`` means ``C = L - P``.

    Args:
        hidden: ``(B, L, ...)`` per-position states (hidden states, or logits).
        prompt_length: ``P >= 1``, the padded prompt length (index of the first completion token).
        completion_length: ``C``; ``None`` for ``L - P``.

    Returns:
        ``(B, C, ...)`` view of ``hidden``.
    """
    length = hidden.shape[1]
    if completion_length is None:
        completion_length = length - prompt_length
    if prompt_length < 1 or completion_length < 0 or prompt_length + completion_length > length:
        raise ValueError(
            f"need 1 <= prompt_length and prompt_length + completion_length <= sequence length {length}, "
            f"got prompt_length={prompt_length}, completion_length={completion_length}"
        )
    return hidden[:, prompt_length - 1 : prompt_length - 1 + completion_length]


def completion_signals(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_length: int,
    *,
    completion_length: int | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """:func:`token_signals` for the completion part of full-sequence hidden states.

    ``targets = input_ids[:, P : P + C]`` and ``hidden = hidden[:, P - 1 : P - 1 + C]``
    (:func:`completion_hidden_states`); ``kwargs`` go to :func:`token_signals`.

    Returns:
        ``{name: (B, C) fp32 tensor}``; completion padding positions hold values for the pad id,
        mask them with the completion mask.
    """
    states = completion_hidden_states(hidden, prompt_length, completion_length)
    targets = input_ids[:, prompt_length : prompt_length + states.shape[1]]
    return token_signals(states, weight, targets, **kwargs)


def outside_vocab(completion_ids: Sequence[Sequence[int]], vocab_size: int) -> list[bool]:
    """Which completions hold a sampled id outside the tokenizer (``>= vocab_size``).

    Such an id is one of the LM head's padding rows (Qwen2.5: 151,936 rows for 151,665 tokens),
    which sampling can draw. Signals are defined over the tokenizer's tokens only, so these
    completions are not scored by internal rewards (:func:`skip_outside_vocab`).

    >>> outside_vocab([[1, 2], [3, 104], []], 104)
    [False, True, False]
    """
    return [any(int(t) >= vocab_size for t in ids) for ids in completion_ids]


def in_vocab_targets(targets: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``targets`` with every id ``>= vocab_size`` replaced by 0, so a vocabulary-restricted
    projection can run; the values at those positions mean nothing and the completions holding
    them are skipped (:func:`skip_outside_vocab`). ``vocab_size=None``: unchanged.

    >>> in_vocab_targets(torch.tensor([[3, 105], [7, 1]]), 104).tolist()
    [[3, 0], [7, 1]]
    """
    return targets if vocab_size is None else targets.masked_fill(targets >= vocab_size, 0)


def skip_outside_vocab(signal_dicts: Sequence[dict], completion_ids: Sequence[Sequence[int]], vocab_size: int) -> int:
    """The padded-rows rule: a completion holding an id ``>= vocab_size`` gets NaN in every per-token
    signal tensor of its dict (in place; ``ic_layers`` / ``ic_answer_found`` are kept), so every
    internal reward of it is skipped (``None``, left out of its group). Returns how many.

    >>> d = [{"entropy": torch.tensor([1.0, 2.0]), "ic_layers": [2]}, {"entropy": torch.tensor([1.0])}]
    >>> skip_outside_vocab(d, [[5, 200], [5]], 104), d[0]["entropy"].isnan().all().item(), d[1]["entropy"].tolist()
    (1, True, [1.0])
    """
    flags = outside_vocab(completion_ids, vocab_size)
    for signals, flagged in zip(signal_dicts, flags):
        if flagged:
            for name, value in signals.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    signals[name] = torch.full_like(value, float("nan"))
    return sum(flags)


@dataclass(frozen=True)
class Needs:
    """What a list of rewards reads of the policy (:func:`signal_needs`)."""

    signals: tuple[str, ...]  # per-token signals, of :data:`SIGNALS` (in that order)
    lens_modes: tuple[str, ...]  # logit-lens modes: the ``ic_<mode>`` of ``LENS_SIGNALS`` declared (in that order)
    lens_layers: list[int] | None  # union of the layers the lens rewards read; None without lens modes or model
    delta: bool = False  # CLUE's hidden-state delta (``hidden_delta``) is read
    delta_layers: list[int] | None = None  # union of the layers the delta readers read (None: every layer)


def signal_needs(rewards, model=None) -> Needs:
    """Which signals, logit-lens modes and lens layers ``rewards`` (any rewards; only
    :class:`rewards.InternalReward` ones read signals) need from a pass of ``model``.

    The layers are the union of each lens reward's ``layers`` (``None``: :func:`rewards.default_layers`
    of ``model``'s depth); they need ``model``. A declared signal no pass computes is a ``ValueError``.

    >>> from rewards import InternalConsistency, MathAccuracy, SelfCertainty
    >>> needs = signal_needs([SelfCertainty(), MathAccuracy(), InternalConsistency(mode="soft", layers=[1, 3])])
    >>> needs.signals, needs.lens_modes
    (('self_certainty',), ('soft',))
    """
    internal = [r for r in rewards if isinstance(r, InternalReward)]
    needed = {s for r in internal for s in r.signals} - {"ic_layers", "ic_answer_found", "hidden_delta_layers"}
    unknown = needed - set(SIGNALS) - set(LENS_SIGNALS) - {"hidden_delta"}
    if unknown:
        raise ValueError(f"unknown internal signals {sorted(unknown)}; available: {list(SIGNALS + LENS_SIGNALS)}")
    lens_modes = tuple(m[3:] for m in LENS_SIGNALS if m in needed)
    layers = None
    if lens_modes and model is not None:
        depth = len(lens_modules(model)[0])
        layers = sorted({layer for r in internal if set(r.signals) & set(LENS_SIGNALS)
                         for layer in (getattr(r, "layers", None) or default_layers(depth))})
    readers = [getattr(r, "layers", None) for r in internal if "hidden_delta" in r.signals]
    delta_layers = None if not readers or None in readers else sorted({x for c in readers for x in c})
    return Needs(tuple(s for s in SIGNALS if s in needed), lens_modes, layers, bool(readers), delta_layers)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, empty: float = float("nan")) -> torch.Tensor:
    """Per-sequence mean over the last dimension: ``sum_t m_t v_t / sum_t m_t``.

    Masked-out entries never contribute, even when they are NaN or inf. A row with no unmasked
    entry gets ``empty`` (NaN by default: TRL treats a NaN reward as "no reward for this
    completion" and leaves it out of the group baseline, instead of scoring it 0).

    Args:
        values: ``(..., L)`` float tensor.
        mask: ``(..., L)`` bool or 0/1 tensor.
        empty: value for rows whose mask is all zero.

    Returns:
        ``(...)`` fp32 tensor.
    """
    keep = mask.bool()
    total = torch.where(keep, values.float(), 0.0).sum(-1)
    count = keep.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, empty))


def pack_prompt_completion(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """TRL's scoring layout: prompts left-padded, completions right-padded, concatenated.

    Returns ``(input_ids, attention_mask, P)`` with ``P`` the padded prompt length, so
    ``attention_mask[:, P:]`` is the completion mask (see :func:`completion_signals`).
    """
    from trl.trainer.utils import pad

    def padded(seqs, value, side):
        tensors = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
        return pad(tensors, padding_value=value, padding_side=side, pad_to_multiple_of=pad_to_multiple_of)

    prompts = padded(prompt_ids, pad_id, "left")
    ids = torch.cat([prompts, padded(completion_ids, pad_id, "right")], dim=1)
    mask = torch.cat([padded([[1] * len(p) for p in prompt_ids], 0, "left"),
                      padded([[1] * len(c) for c in completion_ids], 0, "right")], dim=1)
    return ids, mask, prompts.shape[1]


@torch.no_grad()
def token_signal_dicts(model, tokenizer, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                       prompts: Sequence, *, temperature: float, signals: Sequence[str] = (),
                       lens_modes: Sequence[str] = (), lens_layers: Sequence[int] | None = None, batch_size: int = 64,
                       fallback_last_k: int | None = 4, quantile: float = 0.5,
                       delta_layers: Sequence[int] | None = None) -> list[dict]:
    """Internal signals of a decoder-only ``model`` on given completions, as ``RLIFTrainer`` hands them to rewards.

    One no-grad pass per batch (TRL's layout, :func:`pack_prompt_completion`) yields, per completion,
    1-D per-token tensors of ``signals`` (EOS included; vocabulary restricted to ``len(tokenizer)``)
    and, with ``lens_modes``, the logit-lens agreement ``ic_<mode>`` at the answer tokens
    (:mod:`trainers.lens`). ``prompts`` define the groups of the ``candidates`` mode, whose
    per-layer thresholds are estimated over all the completions given (dataset-level calibration);
    only the lens statistics of each batch are kept between batches, not its hidden states.
    A completion holding an id outside the tokenizer (a padding row of the head) gets NaN
    signals throughout (:func:`skip_outside_vocab`), so its internal rewards are skipped.
    ``"hidden_delta"`` among ``signals`` adds CLUE's hidden-state delta over the reasoning
    (:mod:`trainers.clue`): ``hidden_delta`` ``(K, H)`` of ``delta_layers`` (``None``: all) and
    ``hidden_delta_layers``, read by hooks in the same pass.
    """
    delta = "hidden_delta" in signals
    signals = tuple(s for s in signals if s != "hidden_delta")
    unknown = (set(signals) - set(SIGNALS)) | ({f"ic_{m}" for m in lens_modes} - set(LENS_SIGNALS))
    if unknown:
        raise ValueError(f"unknown signals {sorted(unknown)}; available: {list(SIGNALS + LENS_SIGNALS)}")
    out: list[dict] = [{} for _ in completion_ids]
    head, backbone = unwrap(model).get_output_embeddings(), lm_backbone(model)
    transform = logit_transform(model)
    vocab = len(tokenizer) if len(tokenizer) < head.weight.shape[0] else None
    lens = LogitLens(model, lens_layers, vocab_size=len(tokenizer), tokenizer=tokenizer) if lens_modes else None
    if lens is not None:
        indices, found, answer_ids = locate_answers(tokenizer, completion_ids, fallback_last_k)
        emitted = torch.tensor([t for ids in answer_ids for t in ids], dtype=torch.long)
        candidates = group_candidates(prompts, answer_ids, found) if "candidates" in lens_modes else None
        stats, position = [], 0
    reader = HiddenDelta(model, delta_layers) if delta else None
    spans = reasoning_positions(tokenizer, completion_ids) if delta else None
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(completion_ids), batch_size):
            batch = list(completion_ids[i : i + batch_size])
            ids, mask, p = pack_prompt_completion(prompt_ids[i : i + batch_size], batch, tokenizer.pad_token_id)
            ids, mask = ids.to(head.weight.device), mask.to(head.weight.device)
            if lens is not None:
                lens.arm(indices[i : i + batch_size], ids.shape[1] - p)
            if reader is not None:
                reader.arm(spans[i : i + batch_size], ids.shape[1] - p)
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            if signals:
                values = completion_signals(hidden, head.weight, in_vocab_targets(ids, vocab), p, bias=head.bias,
                                            temperature=temperature, signals=tuple(signals), vocab_size=vocab,
                                            **transform.kwargs())
                for j, c in enumerate(batch):
                    out[i + j].update({name: v[j, : len(c)].float().cpu() for name, v in values.items()})
            if reader is not None:
                for j, d in enumerate(reader.collect()):
                    out[i + j].update(hidden_delta=d, hidden_delta_layers=list(reader.layers))
            if lens is not None:
                states, counts = lens.collect()
                window = slice(position, position + sum(counts))
                stats.append(lens.statistics(states, emitted[window],
                                             None if candidates is None else candidates[window]))
                position = window.stop
        if lens is not None:
            merged = {key: torch.cat([s[key] for s in stats]) for key in stats[0]} if stats else {}
            for extra, lensed in zip(out, per_completion(agreement(merged, emitted, tuple(lens_modes), candidates, quantile),
                                                         [len(x) for x in indices], lens.layers, found)):
                extra.update(lensed)
    finally:
        model.train(was_training)
        if lens is not None:
            lens.remove()
        if reader is not None:
            reader.remove()
    skip_outside_vocab(out, completion_ids, len(tokenizer))
    return out
