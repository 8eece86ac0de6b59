"""DeCRED's losses as pure functions: label-smoothed cross-entropy of heads, chunked or fused, and CTC.

``CE_ls(z, y) = (1 - ε)(-log p_y) + ε · mean_v(-log p_v)``, ``p = softmax(z)`` (transformers'
``LabelSmoother``), summed over the labelled tokens (``labels == IGNORE`` are left out):
:func:`chunked_head_loss` projects any head chunk by chunk under activation checkpointing;
:func:`fused_heads_ce` computes loss and gradients of linear heads in one chunk loop;
:func:`ctc_loss` is the encoder's CTC term of the hybrid loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
"""Label id of a position that no head is trained on (transformers' convention)."""


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Per-token ``(1 - ε)(-log p_y) + ε · mean_v(-log p_v)`` in float32; 0 where ``labels == -100``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != IGNORE
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - epsilon) * nll - epsilon * logp.mean(-1) if epsilon else nll
    return loss.masked_fill(~valid, 0.0)


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable, epsilon: float):
    logits = head(hidden)
    loss = label_smoothed_ce(logits, labels, epsilon).sum()
    correct = (logits.detach().argmax(-1) == labels).sum()
    return loss, correct


def chunked_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      epsilon: float = 0.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_t CE_ls(head(hidden_t), y_t)`` over labelled tokens, and the number of top-1 hits.

    ``hidden`` is ``(..., H)`` and ``labels`` ``(...)`` (``-100`` = ignored). Only labelled rows are
    projected, ``chunk_size`` at a time; with gradients on, each chunk runs under activation
    checkpointing, so at most one chunk's ``(chunk, V)`` logits are alive (the backward recomputes
    them, one chunk at a time).
    """
    mask = labels != IGNORE
    rows, targets = hidden[mask], labels[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    if rows.shape[0] == 0:
        return total + 0.0 * hidden.sum(), correct  # keep the graph connected
    grad = torch.is_grad_enabled()
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            loss, hits = checkpoint(_chunk_loss, h, y, head, epsilon, use_reentrant=False)
        else:
            loss, hits = _chunk_loss(h, y, head, epsilon)
        total, correct = total + loss, correct + hits
    return total, correct


def _fused_heads_ce_pass(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w, need_b):
    """The forward of :class:`_FusedHeadsCE`: per-head sums and hits, and, where asked, the
    gradients of ``Σ_k c_k Σ_t CE_ls`` w.r.t. each ``x_k``, the weight and the bias. The GEMMs run
    in the autocast dtype when autocast is on (else the inputs'), everything else in float32."""
    device = weight.device
    cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else xs[0].dtype
    with torch.autocast(device.type, enabled=False):
        return _fused_heads_ce_loop(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w,
                                    need_b, cd)


def _fused_heads_ce_loop(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w, need_b, cd):
    device = weight.device
    w = weight.to(cd)
    V = w.shape[0]
    dense = softcap is not None  # softcapped logits: build the whole logit gradient per chunk
    gw = torch.zeros(w.shape, device=device, dtype=torch.float32) if need_w else None
    gb = torch.zeros(V, device=device, dtype=torch.float32) if need_b else None
    x_total = torch.zeros(w.shape[1], device=device, dtype=torch.float32)  # Σ_k c_k Σ_t x_kt (ε term of gw)
    row_total = 0.0  # Σ_k c_k n_k (ε term of gb)
    w_sum = w.float().sum(0) if epsilon and not dense and any(need_x) else None  # Σ_v W_v (ε term of gx)
    b = bias.float() if bias is not None else None
    sums = torch.zeros(len(xs), device=device, dtype=torch.float32)
    hits = torch.zeros(len(xs), device=device, dtype=torch.long)
    grads_x = []
    for k, x in enumerate(xs):
        c = float(coefs[k])
        gx = torch.empty(x.shape, device=device, dtype=torch.float32) if need_x[k] else None
        for start in range(0, x.shape[0], chunk_size):
            xc, y = x[start : start + chunk_size].to(cd), targets[start : start + chunk_size]
            n = xc.shape[0]
            z = torch.mm(xc, w.t()).float()
            if b is not None:
                z += b
            if dense:
                t = torch.tanh(z / softcap)
                z = t * softcap
            zy = z.gather(1, y.unsqueeze(1)).squeeze(1)
            m = z.amax(1)
            top = zy == m  # a hit iff the label is the first maximum (argmax's tie rule)
            if bool(top.any()):
                rows = top.nonzero().squeeze(1)
                hits[k] += (z[rows].argmax(1) == y[rows]).sum()
            z_mean = z.mean(1) if epsilon else None
            e = z.sub_(m.unsqueeze(1)).exp_()  # in place: z is no longer needed
            s = e.sum(1)
            rows_loss = m + s.log() - (1.0 - epsilon) * zy
            if epsilon:
                rows_loss -= epsilon * z_mean
            sums[k] += rows_loss.sum()
            if not (need_x[k] or need_w or need_b):
                continue
            r = c / s  # row scale: c · softmax = (c / s) · e
            if dense:  # g = c (p - (1-ε) 1_y - ε/V), times d softcap(z)/dz = 1 - t²
                g = e.mul_(r.unsqueeze(1))
                if epsilon:
                    g -= c * epsilon / V
                g[torch.arange(n, device=device), y] -= c * (1.0 - epsilon)
                g *= 1.0 - t * t
                gc = g.to(cd)
                if gx is not None:
                    gx[start : start + n] = torch.mm(gc, w).float()
                if gw is not None:
                    gw += torch.mm(gc.t(), xc).float()
                if gb is not None:
                    gb += g.sum(0)
                continue
            # g = c·p - c(1-ε)·1_y - cε/V: the dense part is e scaled per row; the rest is sparse or rank one
            ec = e.to(cd)
            if gx is not None:
                part = torch.mm(ec, w).float().mul_(r.unsqueeze(1))
                part -= (c * (1.0 - epsilon)) * w[y].float()
                if epsilon:
                    part -= (c * epsilon / V) * w_sum
                gx[start : start + n] = part
            if gw is not None:
                xf = xc.float()
                scaled = (xf * r.unsqueeze(1)).to(cd)
                if cd == torch.float32:
                    gw.addmm_(ec.t(), scaled)
                else:
                    gw += torch.mm(ec.t(), scaled).float()
                gw.index_add_(0, y, xf, alpha=-c * (1.0 - epsilon))
                if epsilon:
                    x_total += c * xf.sum(0)
            if gb is not None:
                gb += torch.mv(e.t(), r)
                gb.index_add_(0, y, torch.full((n,), -c * (1.0 - epsilon), device=device))
                row_total += c * n
        grads_x.append(gx)
    if epsilon and not dense:
        if gw is not None:
            gw -= (epsilon / V) * x_total.unsqueeze(0)
        if gb is not None:
            gb -= epsilon * row_total / V
    total = (sums * torch.tensor(coefs, device=device, dtype=torch.float32)).sum()
    grads_x = [g.to(x.dtype) if g is not None else None for g, x in zip(grads_x, xs)]
    return total, sums, hits, grads_x, gw.to(weight.dtype) if gw is not None else None, \
        gb.to(bias.dtype) if gb is not None else None


class _FusedHeadsCE(torch.autograd.Function):
    """Loss and gradients of :func:`fused_heads_ce` in one pass over the chunks: the backward only
    scales the gradients the forward already computed (no recomputation of any projection)."""

    @staticmethod
    def forward(ctx, weight, bias, targets, coefs, epsilon, chunk_size, softcap, *xs):
        need = ctx.needs_input_grad
        total, sums, hits, gx, gw, gb = _fused_heads_ce_pass(
            xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, list(need[7:]), need[0], need[1])
        ctx.grads = (gw, gb, gx)
        ctx.mark_non_differentiable(sums, hits)
        return total, sums, hits

    @staticmethod
    def backward(ctx, grad_total, *_):
        if ctx.grads is None:
            raise RuntimeError("fused_heads_ce: its gradients are computed in the forward; backward runs once")
        gw, gb, gx = ctx.grads
        ctx.grads = None
        if grad_total is None:
            return (None,) * (7 + len(gx))
        scale = [g.mul_(grad_total) if g is not None else None for g in (gw, gb, *gx)]
        return scale[0], scale[1], None, None, None, None, None, *scale[2:]


def fused_heads_ce(xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   coefs: list[float], epsilon: float = 0.0, chunk_size: int = 1024, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads that share one linear projection, each on its own rows ``x_k`` (``(N, H)``, labelled
    rows only) with the same ``targets`` (``(N,)``)::

        z_k = cap(x_k W^T + b),  cap(z) = s·tanh(z / s) (softcap s) or z
        total = Σ_k c_k Σ_t CE_ls(z_kt, y_t)

    Returns ``total`` (differentiable w.r.t. every ``x_k``, ``W`` and ``b``), each head's
    ``Σ_t CE_ls`` and its number of top-1 hits (both detached). Chunks of ``chunk_size`` rows; the
    gradients are computed in the same chunk loop as the loss, from ``∂CE_ls/∂z = p - (1-ε)·1_y -
    ε/V`` (``p`` never normalised as a matrix: ``p = e / Σe`` is folded into the GEMMs row-wise,
    the label and smoothing terms are a row gather and a rank-one update), so no ``(N, V)`` tensor
    outlives a chunk and backward recomputes nothing. The gradient of ``W`` (one per call, shared
    by its heads) is held from forward to backward.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or any(x.requires_grad for x in xs)
                                     or (bias is not None and bias.requires_grad)):
        return _FusedHeadsCE.apply(weight, bias, targets, list(coefs), float(epsilon), int(chunk_size), softcap, *xs)
    total, sums, hits, *_ = _fused_heads_ce_pass(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap,
                                                 [False] * len(xs), False, False)
    return total, sums, hits


def ctc_loss(log_probs: torch.Tensor, output_lengths: torch.Tensor, labels: torch.Tensor, blank: int) -> torch.Tensor:
    """Mean over the batch of ``CTC(log_probs_b[:T_b], y_b) / |y_b|`` (``labels`` padded with -100;
    blank ids in the labels are dropped), as ``F.ctc_loss(reduction="mean")``."""
    valid = (labels != IGNORE) & (labels != blank)
    targets = labels[valid]
    target_lengths = valid.sum(-1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs.float().transpose(0, 1), targets, output_lengths, target_lengths, blank=blank,
                          reduction="mean", zero_infinity=True)
