"""Logit lens at the answer tokens: internal consistency (Xie et al.) without ``(B, L, V)`` tensors.

For a decoder layer ``l`` (``1..L``, the index of ``hidden_states[l]`` in transformers, whose
entry ``L`` is already final-normed) the lens logits are ``z^l = head(norm(h^l))`` with the
model's own final norm and output embeddings; the last layer's lens is the model's own logits.
At each position that predicts an answer token ``y`` (teacher forcing on the completion):

=================  ================================================================================
mode               agreement of layer ``l``
=================  ================================================================================
``hard``           ``1[argmax z^l = argmax z^L]`` (argmax over the first ``vocab_size`` rows only)
``soft``           ``softmax(z^l)[y]``
``candidates``     ``1[vote_l = y]``: ``vote_l = argmax_c softmax(z^l[C])_c - tau_l(c)`` over the
                   candidate tokens ``C`` (what the group's distinct answers emit at this answer
                   index), ``tau_l(c)`` the batch quantile of layer ``l``'s restricted probability
                   of ``c``. A group that agrees on a token has one candidate, so every layer
                   agrees there: a unanimous group scores 1 whatever the layers say.
``calibrated``     the paper's calibration over a fixed label set ``Y`` (``calibrated``: the digits
                   and ``-``, for numeric answers; ``calibrated_choices``: ``A``-``E``):
                   ``p^l = softmax(z^l[Y])``, per layer and label the threshold ``q^l_m`` = the
                   ``(M-1)/M`` quantile of ``p^l_m`` over the batch's label positions, calibrated
                   score ``s^l_m = 1[p^l_m > q^l_m] + 1[p^l_m = q^l_m] / M`` (the tie rule), final
                   prediction ``m* = argmax_m s^L_m`` (first on ties), agreement ``s^l_{m*}`` in
                   ``{0, 1/M, 1}`` (:func:`calibrated_agreement`). Answer tokens outside ``Y`` get
                   NaN (not scored).
=================  ================================================================================

Internal consistency = weighted mean over the chosen layers, mean over the answer tokens.

How it stays cheap (:class:`LogitLens`): forward hooks on the chosen decoder layers copy out only
the rows at the gathered positions (``K x N x H`` for ``K`` layers and ``N`` answer tokens in the
batch) during a no-grad pass that runs anyway; :func:`lens_readout` then projects them through
norm and head in token x vocabulary tiles, keeping running max / argmax / logsumexp, so no
``(N, V)`` tensor larger than one tile exists. Under ZeRO-3 the norm and head parameters are
gathered for the readout (``maybe_gather_lm_head_ctx``).

>>> import torch
>>> from transformers import Qwen2Config, Qwen2ForCausalLM
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
...                                      num_attention_heads=2, num_key_value_heads=1)).eval()
>>> lens = LogitLens(model)               # default: the upper half of the layers (+ the last one)
>>> lens.layers
[2, 3, 4]
>>> ids = torch.randint(0, 40, (2, 7))   # prompt of 4 tokens, completion of 3
>>> lens.arm([[1, 2], [0]], completion_length=3)
>>> with torch.no_grad():
...     _ = model(ids)
>>> states, counts = lens.collect()
>>> states.shape, counts
(torch.Size([3, 3, 16]), [2, 1])
>>> out = lens.readout(states, emitted=torch.tensor([ids[0, 5], ids[0, 6], ids[1, 4]]), modes=("hard", "soft"))
>>> out["hard"].shape, bool((out["hard"][:, -1] == 1).all())
(torch.Size([3, 3]), True)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from rewards import default_layers, find_answer, group_rows

from .generation_capture import StepStates
from .logit_transform import IDENTITY, LogitTransform, logit_transform
from .model_parts import NORM_NAMES, UnsupportedModelError, decoder_parts
from .projection import compute_dtype, default_chunks, project

__all__ = ["BATCH_MODES", "LABEL_SETS", "MODES", "LogitLens", "agreement", "answer_token_indices",
           "calibrated_agreement", "calibrated_votes", "group_candidates", "label_token_ids", "lens_modules",
           "lens_readout", "locate_answers", "per_completion"]

MODES = ("hard", "soft", "candidates", "calibrated", "calibrated_choices")

LABEL_SETS = {"calibrated": tuple("0123456789-"), "calibrated_choices": tuple("ABCDE")}
"""The fixed label set of each calibrated mode: digits and sign for numeric answers, choice letters."""

BATCH_MODES = ("candidates", "calibrated", "calibrated_choices")
"""Modes whose value at a position depends on the whole batch (thresholds estimated over it)."""


def label_token_ids(tokenizer, labels) -> list[int] | None:
    """One token id per label (the label's own single token), or ``None`` if some label is not one token.

    >>> from recipes.common.tiny.tokenizer import build_char_tokenizer
    >>> tok = build_char_tokenizer()
    >>> tok.convert_ids_to_tokens(label_token_ids(tok, LABEL_SETS["calibrated_choices"]))
    ['A', 'B', 'C', 'D', 'E']
    """
    ids = []
    for label in labels:
        encoded = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            token = tokenizer.convert_tokens_to_ids(label)
            if token is None or token == tokenizer.unk_token_id:
                return None
            encoded = [token]
        ids.append(int(encoded[0]))
    return ids if len(set(ids)) == len(ids) else None


def lens_modules(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """``(decoder layers, final norm, output embeddings)`` of a causal LM (PEFT-wrapped or not).

    The modules :func:`trainers.model_parts.decoder_parts` finds; the lens needs a decoder-only
    model with a final norm. Anything else raises a ``TypeError`` naming what is missing.
    """
    try:
        parts = decoder_parts(model)
    except UnsupportedModelError as err:
        raise TypeError(f"the logit lens does not support {err}") from None
    name = type(parts.model).__name__
    if parts.encoder_decoder:
        raise TypeError(f"the logit lens does not support {name}: it reads the decoder layer list and final norm "
                        "of a decoder-only model, and this is an encoder-decoder")
    if parts.norm is None:
        raise TypeError(f"the logit lens does not support {name}: missing a final norm "
                        f"({'/'.join(NORM_NAMES)} beside its decoder layer list)")
    return parts.layers, parts.norm, parts.lm_head


def answer_token_indices(tokenizer, completion_ids: Sequence[int], fallback_last_k: int | None = 4
                         ) -> tuple[list[int], bool]:
    """Indices (within the completion) of the tokens of the answer's first emission, and whether it parsed.

    The answer is what :func:`rewards.find_answer` extracts (last ``\\boxed{}``, else last number);
    its first emission is the first occurrence of that text standing on its own (not inside a
    longer number or word), at or before the extracted span. Every token overlapping those
    characters counts. When no answer parses, the last ``fallback_last_k`` tokens that decode to
    text (``[]`` when ``None``). Ids outside the tokenizer (padding rows of the LM head; checked
    when the tokenizer has a length) decode to nothing and are never answer positions.

    >>> class Chars:  # any tokenizer with ``batch_decode``; here one character per token
    ...     def batch_decode(self, ids, skip_special_tokens=True):
    ...         return [chr(i[0]) for i in ids]
    >>> answer_token_indices(Chars(), [ord(c) for c in "12+34=46. So \\\\boxed{46}"])
    ([6, 7], True)
    >>> answer_token_indices(Chars(), [ord(c) for c in "no idea"], fallback_last_k=2)
    ([5, 6], False)
    """
    ids = list(completion_ids)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    known = [t for t in ids if vocab is None or t < vocab]
    decoded = iter(tokenizer.batch_decode([[t] for t in known], skip_special_tokens=True) if known else [])
    pieces = [next(decoded) if vocab is None or t < vocab else "" for t in ids]
    text = "".join(pieces)
    answer = find_answer(text)
    if answer is None or not answer.text:
        content = [i for i, p in enumerate(pieces) if p]
        return (content[-fallback_last_k:] if fallback_last_k else []), False
    pattern = r"(?<![\w.])" + re.escape(answer.text) + r"(?!\w)"
    first = re.search(pattern, text[: answer.end])
    start, end = (first.start(), first.end()) if first else (answer.start, answer.end)
    out, position = [], 0
    for i, piece in enumerate(pieces):
        if piece and position < end and position + len(piece) > start:
            out.append(i)
        position += len(piece)
    return out, True


def locate_answers(tokenizer, completion_ids: Sequence[Sequence[int]], fallback_last_k: int | None = 4
                   ) -> tuple[list[list[int]], list[bool], list[list[int]]]:
    """:func:`answer_token_indices` of every completion: ``(indices, found, answer token ids)``."""
    located = [answer_token_indices(tokenizer, ids, fallback_last_k) for ids in completion_ids]
    return ([indices for indices, _ in located], [found for _, found in located],
            [[ids[t] for t in indices] for ids, (indices, _) in zip(completion_ids, located)])


def group_candidates(prompts: Sequence, answer_ids: Sequence[Sequence[int]], found: Sequence[bool]) -> torch.Tensor:
    """Candidate tokens of every answer position (rows in completion order), ``-1``-padded ``(N, M)``.

    At answer index ``j`` of completion ``i``: its own token, then token ``j`` of every parsed
    answer in its group (consecutive identical prompts), each distinct token once.

    >>> group_candidates(["q", "q", "q"], [[5, 7], [5, 8], [9]], [True, True, False]).tolist()
    [[5, -1], [7, 8], [5, -1], [8, 7], [9, 5]]
    """
    rows_out = []
    for rows in group_rows(list(prompts)):
        for i in rows:
            for j, own in enumerate(answer_ids[i]):
                tokens = [own] + [answer_ids[k][j] for k in rows if found[k] and len(answer_ids[k]) > j]
                rows_out.append(list(dict.fromkeys(tokens)))
    width = max(map(len, rows_out), default=1)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows_out], dtype=torch.long).view(-1, width)


class LogitLens:
    """Forward hooks that keep the chosen layers' states at the positions predicting given tokens.

    ``layers`` are 1-based ``hidden_states`` indices (``None``: :func:`default_layers`); the last
    layer is always added (its lens is the model's prediction, the reference of ``hard``).
    :meth:`arm` before a no-grad forward (or several consecutive micro-batch forwards over the
    rows in order), :meth:`collect` after. Batches are TRL's layout: each row ends with its
    completion of ``completion_length`` tokens (right-padded), so completion token ``t`` of a row
    of length ``S`` is predicted by position ``S - completion_length - 1 + t``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, vocab_size: int | None = None,
                 tokenizer=None):
        self.modules, self.norm, self.head = lens_modules(model)
        # the calibrated modes' fixed label sets, as token ids (needs the tokenizer)
        self.label_sets = {} if tokenizer is None else {
            mode: torch.tensor(ids) for mode, labels in LABEL_SETS.items()
            if (ids := label_token_ids(tokenizer, labels)) is not None}
        n = len(self.modules)
        chosen = default_layers(n) if layers is None else list(layers)
        bad = [layer for layer in chosen if not 1 <= int(layer) <= n]
        if bad:
            raise ValueError(f"logit lens layers must be in 1..{n} (the model has {n} decoder layers), got {bad}")
        self.layers = sorted({int(layer) for layer in chosen} | {n})
        self.vocab_size = vocab_size
        self.transform = logit_transform(model)
        self._indices: list[list[int]] | None = None
        self._steps: dict[int, StepStates] | None = None
        self._handles = [self.modules[layer - 1].register_forward_hook(self._hook(layer)) for layer in self.layers]

    def arm(self, indices: Sequence[Sequence[int]], completion_length: int) -> None:
        """Capture, for each following row ``r``, the positions predicting completion tokens ``indices[r]``."""
        self._indices, self._completion_length, self._row = [list(i) for i in indices], completion_length, 0
        self._parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    @property
    def armed(self) -> bool:
        return self._indices is not None

    def collect(self) -> tuple[torch.Tensor, list[int]]:
        """Disarm; return ``(states (K, N, H), counts)``, rows' positions concatenated in order."""
        if self._indices is None:
            raise RuntimeError("LogitLens.collect() without arm()")
        if self._row != len(self._indices):
            raise RuntimeError(f"logit lens saw {self._row} rows, expected {len(self._indices)}")
        counts = [len(i) for i in self._indices]
        states = torch.stack([torch.cat(self._parts[layer]) for layer in self.layers])
        self._indices, self._parts = None, {}
        return states, counts

    def disarm(self) -> None:
        self._indices, self._parts, self._steps = None, {}, None

    def arm_generation(self, rows: int, max_steps: int, prompt_width: int) -> None:
        """Keep each chosen layer's last-position state of every following no-grad forward, one per
        decoding step of one HF generation (:class:`trainers.generation_capture.StepStates`)."""
        self._steps = {layer: StepStates(rows, max_steps, prompt_width) for layer in self.layers}

    def stop_generation(self) -> dict[int, StepStates]:
        """Stop capturing; the per-layer step states :meth:`arm_generation` started (``{}`` if none)."""
        steps, self._steps = self._steps, None
        return steps or {}

    def generation_states(self, steps: dict[int, StepStates], indices: Sequence[Sequence[int]]
                          ) -> tuple[torch.Tensor, list[int]]:
        """``(states (K, N, H), counts)`` as :meth:`collect` returns them, from :meth:`stop_generation`'s
        states: row ``r``'s states predicting its generated tokens ``indices[r]``, rows in order."""
        return torch.stack([steps[layer].gather(indices) for layer in self.layers]), [len(i) for i in indices]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._steps is not None:  # inside a generation (arm_generation)
                if not torch.is_grad_enabled():
                    self._steps[layer].add(output[0] if isinstance(output, tuple) else output)
                return
            if self._indices is None or torch.is_grad_enabled():
                return
            hidden = output[0] if isinstance(output, tuple) else output
            batch, length = hidden.shape[:2]
            rows = self._indices[self._row : self._row + batch]
            offset = length - self._completion_length - 1
            r = torch.tensor([i for i, idx in enumerate(rows) for _ in idx], dtype=torch.long, device=hidden.device)
            c = torch.tensor([offset + t for idx in rows for t in idx], dtype=torch.long, device=hidden.device)
            self._parts[layer].append(hidden[r, c].detach().clone())
            if layer == self.layers[-1]:
                self._row += batch

        return hook

    def signals(self, states: torch.Tensor, counts: Sequence[int], answer_ids: Sequence[Sequence[int]],
                found: Sequence[bool], modes: Sequence[str], prompts: Sequence | None = None,
                quantile: float = 0.5) -> list[dict]:
        """Per-completion reward signals (``rewards.consistency``) from :meth:`collect`'s output.

        ``answer_ids[i]`` are the tokens completion ``i`` emitted at its captured positions;
        ``prompts`` (needed by ``candidates``) define the groups, as for every group reward.
        """
        emitted = torch.tensor([t for ids in answer_ids for t in ids], dtype=torch.long)
        candidates = group_candidates(prompts, answer_ids, found) if "candidates" in modes else None
        stats = self.statistics(states, emitted, candidates)
        return per_completion(agreement(stats, emitted, modes, candidates, quantile), counts, self.layers, found)

    def statistics(self, states: torch.Tensor, emitted: torch.Tensor, candidates: torch.Tensor | None = None,
                   **kwargs) -> dict[str, torch.Tensor]:
        """:func:`lens_readout` with this model's norm and head (gathered under ZeRO-3)."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        bias = getattr(self.head, "bias", None)
        with maybe_gather_lm_head_ctx(*self.norm.parameters(), self.head.weight, bias):
            return lens_readout(states, self.norm, self.head.weight, bias, emitted, vocab_size=self.vocab_size,
                                candidates=candidates, label_sets=self.label_sets or None, transform=self.transform,
                                **kwargs)

    def readout(self, states: torch.Tensor, emitted: torch.Tensor, modes: Sequence[str] = ("hard",),
                candidates: torch.Tensor | None = None, quantile: float = 0.5, **kwargs) -> dict[str, torch.Tensor]:
        """Per-token, per-layer agreement ``{mode: (N, K)}`` for ``states`` from :meth:`collect`."""
        return agreement(self.statistics(states, emitted, candidates if "candidates" in modes else None, **kwargs),
                         emitted, modes, candidates, quantile)


def agreement(stats: dict[str, torch.Tensor], emitted: torch.Tensor, modes: Sequence[str],
              candidates: torch.Tensor | None = None, quantile: float = 0.5) -> dict[str, torch.Tensor]:
    """``{mode: (N, K)}`` per-layer agreement (module docstring) from :func:`lens_readout` statistics."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown logit-lens modes {sorted(unknown)}; choose from {MODES}")
    out = {}
    if "hard" in modes:
        out["hard"] = (stats["argmax"] == stats["argmax"][:, -1:]).float()
    if "soft" in modes:
        out["soft"] = stats["logp"].exp()
    if "candidates" in modes:
        if candidates is None or "candidate_logits" not in stats:
            raise ValueError("mode 'candidates' needs the candidate tokens of every answer position")
        votes = calibrated_votes(stats["candidate_logits"], candidates.to(stats["candidate_logits"].device), quantile)
        out["candidates"] = (votes == emitted.to(votes.device)[:, None]).float()
    for mode in LABEL_SETS:
        if mode in modes:
            if f"label_logits_{mode}" not in stats:
                raise ValueError(f"mode {mode!r} needs the logit lens built with the tokenizer, whose labels "
                                 f"{''.join(LABEL_SETS[mode])} must each be one token")
            out[mode] = calibrated_agreement(stats[f"label_logits_{mode}"], stats[f"label_index_{mode}"])
    return out


def calibrated_agreement(label_logits: torch.Tensor, label_index: torch.Tensor) -> torch.Tensor:
    """Xie et al.'s calibrated agreement of each layer with the calibrated final prediction: ``(N, K)``.

    ``label_logits`` ``(N, K, M)``: each layer's logits of the ``M`` labels at ``N`` positions;
    ``label_index`` ``(N,)``: the emitted label (``-1``: the position's token is not a label; it
    gets NaN and takes no part in the calibration). Over the label positions ``n``:
    ``p = softmax(label_logits)``; ``q_{k,m}`` = the ``(M-1)/M`` quantile (linear interpolation)
    of ``p_{n,k,m}`` over ``n``; ``s = 1[p > q] + 1[p = q] / M``; ``m*_n = argmax_m s_{n,K,m}``
    (the last layer, first label on ties); the result is ``s_{n,k,m*_n}``.

    >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]],    # position 0: layer 1 says label 0, layer 2 label 1
    ...                        [[0.0, 2.0], [0.0, 1.0]],
    ...                        [[0.0, 0.0], [3.0, 0.0]]])
    >>> calibrated_agreement(logits, torch.tensor([1, 1, 0])).tolist()   # q = the 1/2 quantile (the median)
    [[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]]

    (Position 1 sits on both layer-2 medians: a tie, ``s = 1/2`` for both labels, so its final
    prediction is label 0, which layer 1 scores 0.)
    """
    n, k, m = label_logits.shape
    out = torch.full((n, k), float("nan"), device=label_logits.device)
    rows = label_index.to(label_logits.device) >= 0
    if not bool(rows.any()):
        return out
    probs = torch.softmax(label_logits[rows].float(), dim=-1)
    thresholds = torch.quantile(probs, (m - 1) / m, dim=0, keepdim=True)
    scores = (probs > thresholds).float() + (probs == thresholds).float() / m
    final = scores[:, -1].argmax(-1)
    out[rows] = scores.gather(2, final[:, None, None].expand(-1, k, 1)).squeeze(-1)
    return out


def per_completion(agreements: dict[str, torch.Tensor], counts: Sequence[int], layers: Sequence[int],
                   found: Sequence[bool]) -> list[dict]:
    """Split ``{mode: (N, K)}`` into one signal dict per completion (``ic_<mode>``, ``ic_layers``, ``ic_answer_found``)."""
    split = {mode: values.cpu().split(list(counts)) for mode, values in agreements.items()}
    return [{**{f"ic_{mode}": split[mode][i] for mode in agreements}, "ic_layers": list(layers),
             "ic_answer_found": bool(found[i])} for i in range(len(counts))]


@torch.no_grad()
def lens_readout(states: torch.Tensor, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 emitted: torch.Tensor, *, vocab_size: int | None = None, candidates: torch.Tensor | None = None,
                 label_sets: dict[str, torch.Tensor] | None = None, token_chunk: int | None = None,
                 vocab_chunk: int | None = None, transform: LogitTransform = IDENTITY) -> dict[str, torch.Tensor]:
    """Lens statistics of ``K`` layers at ``N`` positions: ``z^k = transform(W[:V] norm(states[k]) + b)``.

    Returns fp32 ``logp (N, K) = log softmax(z^k)[emitted]``, ``argmax (N, K)`` over the first
    ``V = vocab_size`` rows (padding rows of the head never win), and with ``candidates``
    (``(N, M)`` token ids, ``-1`` = none) ``candidate_logits (N, K, M)`` (``-inf`` where ``-1``);
    with ``label_sets`` (``{name: (M,) token ids}``) ``label_logits_<name> (N, K, M)`` and
    ``label_index_<name> (N,)``, the emitted token's index in the set (``-1``: not a label).
    ``transform`` is the model's logit transform after the head (:mod:`trainers.logit_transform`).
    Precision (:func:`trainers.projection.project`): the GEMM runs in the head's dtype (or
    autocast's) with an fp32 tile; every reduction in fp32. Peak extra memory: one
    ``token_chunk x vocab_chunk`` fp32 tile; ``None`` takes the device's default
    (:func:`trainers.projection.default_chunks`: 512 x 4096 on CPU, 4096 x 8192 on CUDA).
    """
    layers, n_tokens, _ = states.shape
    vocab = weight.shape[0] if vocab_size is None else min(int(vocab_size), weight.shape[0])
    weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    device = weight.device
    emitted = emitted.to(device=device, dtype=torch.long)
    logp = torch.empty(n_tokens, layers, device=device)
    argmax = torch.empty(n_tokens, layers, dtype=torch.long, device=device)
    cand = None
    if candidates is not None:
        candidates = candidates.to(device=device, dtype=torch.long)
        cand = torch.full((n_tokens, layers, candidates.shape[1]), float("-inf"), device=device)
    norm_dtype = next(norm.parameters(), weight).dtype
    labels = {name: ids.to(device=device, dtype=torch.long) for name, ids in (label_sets or {}).items()}
    label_logits = {name: torch.empty(n_tokens, layers, len(ids), device=device) for name, ids in labels.items()}
    dtype = compute_dtype(weight)  # decided before autocast is switched off below
    default_tokens, default_cols = default_chunks(device)
    token_chunk, vocab_chunk = token_chunk or default_tokens, vocab_chunk or default_cols

    def logits_at(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # z[ids] for x (n, H), ids (n, ...)
        z = torch.einsum("nh,n...h->n...", x.float(), weight[ids].to(dtype).float())
        return transform.apply(z if bias is None else z + bias[ids].to(dtype).float())

    with torch.autocast(device.type, enabled=False):
        for k in range(layers):
            for start in range(0, n_tokens, token_chunk):
                end = min(start + token_chunk, n_tokens)
                x = norm(states[k, start:end].to(device=device, dtype=norm_dtype)).to(dtype)
                best = torch.full((end - start,), float("-inf"), device=device)
                best_id = torch.zeros(end - start, dtype=torch.long, device=device)
                total = torch.zeros(end - start, device=device)
                for v0 in range(0, vocab, vocab_chunk):
                    z = transform.apply(project(x, weight[v0 : v0 + vocab_chunk],
                                                None if bias is None else bias[v0 : v0 + vocab_chunk], dtype=dtype))
                    tile_max, tile_id = z.max(-1)
                    new_best = torch.maximum(best, tile_max)
                    total = total * torch.exp(best - new_best) + torch.exp(z - new_best[:, None]).sum(-1)
                    best_id = torch.where(tile_max > best, tile_id + v0, best_id)
                    best = new_best
                logp[start:end, k] = logits_at(x, emitted[start:end]) - (best + total.log())
                argmax[start:end, k] = best_id
                if cand is not None:
                    ids = candidates[start:end]
                    z = logits_at(x, ids.clamp(min=0))
                    cand[start:end, k] = torch.where(ids >= 0, z, float("-inf"))
                for name, ids in labels.items():
                    label_logits[name][start:end, k] = logits_at(x, ids.expand(end - start, -1))
    out = {"logp": logp, "argmax": argmax}
    for name, ids in labels.items():
        out[f"label_logits_{name}"] = label_logits[name]
        match = emitted[:, None] == ids[None, :]
        out[f"label_index_{name}"] = torch.where(match.any(-1), match.float().argmax(-1), -1)
    if cand is not None:
        out["candidate_logits"] = cand
    return out


def calibrated_votes(candidate_logits: torch.Tensor, candidates: torch.Tensor, quantile: float = 0.5) -> torch.Tensor:
    """Each layer's calibrated vote among the candidate tokens: ``(N, K)`` token ids.

    ``p = softmax`` of the candidate logits (``(N, K, M)``, ``-inf`` for absent candidates);
    ``tau_k(c)`` = the ``quantile`` of ``p[n, k, m]`` over every position ``n`` where candidate
    ``m`` is token ``c``; the vote is ``candidates[n, argmax_m p[n, k, m] - tau_k(c_m)]``. A layer that
    leans towards a token everywhere (a bias the paper removes with its dataset-level threshold)
    has that lean subtracted. A position with one candidate always votes for it.

    >>> logits = torch.tensor([[[2.0, 0.0]], [[2.0, 1.0]], [[2.0, 1.5]], [[2.0, 3.0]]])  # 4 positions, 1 layer
    >>> cands = torch.tensor([[5, 7]] * 4)
    >>> logits.argmax(-1).squeeze(1).tolist(), calibrated_votes(logits, cands).squeeze(1).tolist()
    ([0, 0, 0, 1], [5, 5, 7, 7])
    """
    present = candidates >= 0
    probs = torch.softmax(candidate_logits, dim=-1).nan_to_num(0.0)
    tokens = candidates[:, None, :].expand_as(probs)
    mask = present[:, None, :].expand_as(probs)
    thresholds = torch.zeros_like(probs)
    for k in range(probs.shape[1]):
        p_k, t_k, m_k = probs[:, k], tokens[:, k], mask[:, k]
        for token in torch.unique(t_k[m_k]).tolist():
            where = m_k & (t_k == token)
            thresholds[:, k][where] = torch.quantile(p_k[where], quantile)
    score = torch.where(mask, probs - thresholds, float("-inf"))
    return torch.gather(tokens, 2, score.argmax(-1, keepdim=True)).squeeze(-1)
