"""The DeCRED regulariser: hooks that capture decoder states during a forward, and the heads' losses.

:class:`DeCREDRegularizer` arms forward hooks on the chosen decoder blocks (and, when needed, on the
backbone and the encoder), and turns the captured states into each head's ``Σ_t CE_ls`` through the
fused path (:func:`trainers.decred.losses.fused_heads_ce`) for linear heads, or the chunked one
for any other head (PEFT, quantised, ZeRO-3 or FSDP2 shards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..model_parts import decoder_parts
from .heads import DeCREDHeads, attach_heads
from .losses import IGNORE, chunked_head_loss, ctc_loss, fused_heads_ce, label_smoothed_ce
from .options import DeCREDOptions, hooked_layers, step_weights


def forward_inputs(inputs: dict) -> dict:
    """A batch's model inputs without ``labels`` (the heads' losses are ours, not the model's)."""
    return {k: v for k, v in inputs.items() if k != "labels"}


def _sharded(obj) -> bool:
    """A ZeRO-3 partitioned parameter, an FSDP2 ``DTensor``, or a module under FSDP."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, nn.Module):
        return type(obj).__name__.startswith("FSDP") or hasattr(obj, "_fsdp_wrapped_module")
    return isinstance(obj, DTensor) or hasattr(obj, "ds_id")


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def _own_final_loss(final_logits: torch.Tensor, targets: torch.Tensor, shift: bool, epsilon: float) -> tuple:
    """``(Σ_t CE_ls, hits)`` of the model's own full logits (standing in for the final head)."""
    logits = final_logits[:, :-1] if shift else final_logits
    return label_smoothed_ce(logits, targets, epsilon).sum(), (logits.detach().argmax(-1) == targets).sum()


class DeCREDRegularizer:
    """Captures the decoder states of the chosen layers (and, when needed, the final and encoder
    states) during an armed forward, and turns them into the per-head losses."""

    def __init__(self, model: nn.Module, options: DeCREDOptions):
        self.options = options
        self.parts = decoder_parts(model)
        options.check_depth(self.parts.num_layers)
        if getattr(self.parts.model, "decred_heads", None) is None:
            attach_heads(self.parts.model, options)
        self.states: dict | None = None
        self._inside: Callable | None = None
        self._handles = [self.parts.layers[l - 1].register_forward_hook(self._hook(l))
                         for l in hooked_layers(options, self.parts.num_layers)]
        self._handles.append(self.parts.model.register_forward_hook(self._top_hook))
        if self.parts.backbone is not None:
            self._handles.append(self.parts.backbone.register_forward_hook(self._hook("final")))
        if self.heads.ctc is not None:
            self._handles.append(self.parts.encoder.register_forward_hook(self._hook("encoder")))

    @property
    def heads(self) -> DeCREDHeads:
        return self.parts.model.decred_heads

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key):
        def hook(module, args, output):
            if self.states is not None:
                value = output.last_hidden_state if key in ("final", "encoder") and hasattr(output, "last_hidden_state") else _first(output)
                self.states.setdefault(key, []).append(value)
        return hook

    @contextlib.contextmanager
    def capture(self, inside: Callable | None = None):
        """Arm the hooks for one forward (or several: states are concatenated along the batch).

        ``inside(output) -> (loss, info)`` runs in a forward hook of the top-level model, i.e.
        within the forward of any wrapper (DDP, DeepSpeed), once the states are captured; its loss
        is also put in the model's output (``loss``) so that DDP's unused-parameter search
        reaches the heads. Its return value is left in ``self.result``.
        """
        self.states, self._inside, self.result = {}, inside, None
        try:
            yield self
        finally:
            self._collect()
            self.states, self._inside = None, None

    def _collect(self) -> None:
        self.captured = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in (self.states or {}).items()}

    def _top_hook(self, module, args, output):
        if self._inside is None or self.states is None:
            return
        inside, self._inside = self._inside, None  # once per armed forward
        self._collect()
        self.result = inside(output)
        ours = self.result[0]
        if isinstance(output, dict) and torch.is_tensor(ours) and ours.requires_grad:
            # DDP rebuilds ModelOutputs from their fields, so the loss rides on ``loss``: ours when
            # the model computed none, else the model's own plus 0·ours (value unchanged)
            own = output.get("loss")
            output["loss"] = ours if own is None else own + 0.0 * ours

    def head_fn(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``hidden -> logits`` of the aux head at ``layer`` (``num_layers``: the final head)."""
        parts, opts = self.parts, self.options
        if layer == parts.num_layers:
            return parts.final_logits
        if opts.head == "shared":
            return lambda h: parts.final_logits(parts.norm(h) if parts.norm is not None else h)
        linear = self.heads.heads[str(layer)]
        if opts.final_norm and parts.norm is not None:
            return lambda h: linear(parts.norm(h))
        return linear

    def head_losses(self, labels: torch.Tensor, shift: bool, final_logits: torch.Tensor | None = None,
                    layers: list[int] | None = None, epsilon: float | None = None) -> dict[int, tuple]:
        """``{layer: (Σ_t CE_ls, hits)}`` over the labelled tokens of the captured states, for
        ``layers`` (default: every aux layer plus the final one). ``shift``: position ``t``
        predicts ``labels[t + 1]`` (causal LM); otherwise ``labels[t]`` (seq2seq decoder).
        ``final_logits`` (the model's own, full) stand in for the final head when given."""
        eps = self.options.label_smoothing if epsilon is None else epsilon
        targets = labels[:, 1:] if shift else labels
        layers = [*self.options.layers, self.num_layers] if layers is None else layers
        out = {}
        for layer in layers:
            if layer == self.num_layers and final_logits is not None:
                out[layer] = _own_final_loss(final_logits, targets, shift, eps)
                continue
            hidden = self._states(layer, shift)
            out[layer] = chunked_head_loss(hidden, targets, self.head_fn(layer), eps, self.options.chunk_size)
        return out

    def _states(self, layer: int, shift: bool) -> torch.Tensor:
        """The captured states of ``layer`` (``num_layers``: the final head's input), aligned with the
        targets (``shift``: the last position predicts nothing); an aux head's are detached in probe mode."""
        hidden = self.captured["final" if layer == self.num_layers else layer]
        hidden = hidden[:, :-1] if shift else hidden
        if self.options.detach and layer != self.num_layers:
            hidden = hidden.detach()
        return hidden

    def _projection(self, layer: int) -> tuple | None:
        """``(key, prep, weight, bias, softcap)`` with ``head_fn(layer)(h) == cap(prep(h) W^T + b)``,
        ``prep`` row-wise (norm, T5's output scale; ``None``: identity), or ``None`` when the head
        is not a plain ``nn.Linear`` on a whole local weight (PEFT/quantised layers, ZeRO-3 or FSDP2
        shards): those go through :func:`chunked_head_loss`. Heads with the same ``key`` share
        ``W`` and ``b`` (the final head and LayerSkip's shared heads)."""
        parts, opts = self.parts, self.options
        shared = layer == parts.num_layers or opts.head == "shared"
        linear = parts.lm_head if shared else self.heads.heads[str(layer)]
        weight = linear.weight
        if type(linear) is not nn.Linear or _sharded(weight) or _sharded(parts.model):
            return None
        norm = parts.norm if layer != parts.num_layers and (shared or opts.final_norm) else None
        scale = parts.pre_scale if shared else 1.0
        if norm is None and scale == 1.0:
            prep = None
        elif norm is None:
            prep = lambda h: h * scale  # noqa: E731
        else:
            prep = (lambda h: norm(h) * scale) if scale != 1.0 else norm
        if not shared:
            return (("head", layer), prep, weight, linear.bias, None)
        bias = linear.bias
        if parts.logits_bias is not None:
            extra = parts.logits_bias.reshape(-1).to(weight.dtype)
            bias = extra if bias is None else bias + extra
        return (("lm_head",), prep, weight, bias, parts.softcap or None)

    def weighted_losses(self, labels: torch.Tensor, shift: bool, weights: dict[int, float],
                        final_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, tuple]]:
        """``Σ_k w_k Σ_t CE_ls(head_k(h_k), y_t)`` over ``weights`` (``{layer: w_k}``), and each
        head's ``(Σ_t CE_ls, hits)``: the same sums as :meth:`head_losses`, computed by
        :func:`fused_heads_ce` for linear heads (one pass per projection, the label gather and
        row selection shared; heads sharing the LM head in one call, so one gradient of ``W``).
        ``final_logits`` (the model's own) stand in for the final head when given."""
        eps = self.options.label_smoothing
        targets = labels[:, 1:] if shift else labels
        mask = targets != IGNORE
        y = targets[mask]
        total = labels.new_zeros((), dtype=torch.float32)
        out: dict[int, tuple] = {}
        groups: dict[tuple, list] = {}
        for layer, w in weights.items():
            if layer == self.num_layers and final_logits is not None:
                out[layer] = _own_final_loss(final_logits, targets, shift, eps)
                total = total + w * out[layer][0]
                continue
            hidden = self._states(layer, shift)
            spec = self._projection(layer)
            if spec is None:
                out[layer] = chunked_head_loss(hidden, targets, self.head_fn(layer), eps, self.options.chunk_size)
                total = total + w * out[layer][0]
                continue
            key, prep, weight, bias, softcap = spec
            rows = hidden[mask]
            group = groups.setdefault(key, [weight, bias, softcap, [], [], []])
            group[3].append(layer)
            group[4].append(prep(rows) if prep is not None else rows)
            group[5].append(w)
        for weight, bias, softcap, layers, xs, coefs in groups.values():
            part, sums, hits = fused_heads_ce(xs, weight, bias, y, coefs, eps, self.options.chunk_size, softcap)
            total = total + part
            for i, layer in enumerate(layers):
                out[layer] = (sums[i], hits[i])
        return total, out

    def weights(self, step: int, max_steps: int) -> dict[int, float]:
        w = step_weights(self.options, self.num_layers, step, max_steps)
        if self.options.detach:  # probes: the model sees plain fine-tuning
            w = {l: (1.0 if self.options.weights is None else v) for l, v in w.items()}
            w[self.num_layers] = 1.0
        return w

    def ctc(self, labels: torch.Tensor, input_lengths: torch.Tensor | None, blank: int) -> torch.Tensor:
        """CTC loss of the CTC head on the captured encoder states."""
        states = self.captured["encoder"]
        log_probs = torch.log_softmax(self.heads.ctc(states).float(), dim=-1)
        frames = states.shape[1]
        encoder = self.parts.encoder
        if input_lengths is not None and hasattr(encoder, "_get_feat_extract_output_lengths"):
            lengths = encoder._get_feat_extract_output_lengths(input_lengths).clamp(max=frames)
        else:
            lengths = torch.full((states.shape[0],), frames, device=states.device)
        return ctc_loss(log_probs, lengths.long(), labels, blank)
