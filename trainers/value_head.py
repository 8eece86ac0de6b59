"""A-LoL's value head ``V(x)`` and its fitting: a small module on the reference's prompt hidden states.

:class:`ValueHead` pools a prompt's hidden states (padding never contributes) and maps the pooled
vector to ``[min_reward, max_reward]``; :func:`fit_value_head` fits it by MSE on per-prompt states
(a share held out, its MSE reported next to the MSE of predicting the mean);
:func:`cross_validate_value_head` measures the same recipe by k-fold cross-validation when nothing
is held out. The precompute (:mod:`trainers.alol_precompute`) gathers the states and targets and
calls :func:`fit_from_args`; docs/METHODS.md §7 gives the reference's settings.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


class ValueHead(nn.Module):
    """``V(x) = min + (max - min) * sigmoid(w . pool(h) + b)`` on the reference's prompt hidden states.

    Two poolings over the prompt's real tokens only (padding never contributes):

    * ``kind="query"``: one learned query ``q`` on layer-normalised (no affine) states,
      ``a = softmax_t(h_t . q / sqrt(H))``, ``pool(h) = sum_t a_t h_t``;
    * ``kind="mha"`` (the A-LoL reference's capacity): ``pool(h) = drop(MHA(q, drop(h), drop(h)))``,
      multi-head attention (``num_heads`` heads, input/output projections) of one learned query
      over the raw states, with dropout ``dropout`` on its input and output.

    >>> head = ValueHead(8, max_reward=2.0)
    >>> v = head(torch.randn(3, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 3))
    >>> v.shape, bool(((v > 0) & (v < 2)).all())
    (torch.Size([3]), True)
    >>> ValueHead(16, kind="mha", num_heads=8, dropout=0.1).eval()(torch.randn(2, 4, 16), torch.ones(2, 4)).shape
    torch.Size([2])
    """

    KINDS = ("query", "mha")

    def __init__(self, hidden_size: int, max_reward: float = 1.0, min_reward: float = 0.0, kind: str = "query",
                 num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if not max_reward > min_reward:
            raise ValueError(f"value head: max_reward ({max_reward}) must exceed min_reward ({min_reward})")
        if kind not in self.KINDS:
            raise ValueError(f"value head: kind must be one of {self.KINDS}, got {kind!r}")
        if kind == "mha" and hidden_size % num_heads:
            raise ValueError(f"value head: hidden size {hidden_size} is not divisible by value_num_heads={num_heads}")
        self.hidden_size, self.max_reward, self.min_reward = hidden_size, float(max_reward), float(min_reward)
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        if kind == "mha":
            self.query = nn.Parameter(torch.randn(hidden_size))  # unscaled, as the reference initialises it
            self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        else:
            self.query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.out = nn.Linear(hidden_size, 1)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        if self.kind == "mha":
            hidden = self.dropout(hidden.float())
            query = self.query.expand(hidden.shape[0], 1, -1)
            # an all-padding row would attend to nothing (NaN): let it attend anywhere, then zero it
            empty = ~mask.any(-1)
            pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=~(mask | empty[:, None]),
                                       need_weights=False)
            return self.dropout(pooled[:, 0].masked_fill(empty[:, None], 0.0))
        hidden = nn.functional.layer_norm(hidden.float(), (self.hidden_size,))
        scores = (hidden @ self.query) / math.sqrt(self.hidden_size)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-padding row pools to 0
        return self.dropout((weights.unsqueeze(-1) * hidden).sum(1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logit = self.out(self.pool(hidden, mask)).squeeze(-1)
        return self.min_reward + (self.max_reward - self.min_reward) * torch.sigmoid(logit)

    @classmethod
    def from_args(cls, args, hidden_size: int) -> "ValueHead":
        """The head an :class:`ALoLConfig` asks for."""
        return cls(hidden_size, max_reward=args.max_reward, min_reward=args.min_reward, kind=args.value_head,
                   num_heads=args.value_num_heads, dropout=args.value_dropout)


def _padded(hidden: list[torch.Tensor], targets: torch.Tensor, indices: list[int], device):
    states = [hidden[i] for i in indices]
    width = max(s.shape[0] for s in states)
    h = torch.zeros(len(states), width, states[0].shape[-1], dtype=torch.float32)
    m = torch.zeros(len(states), width, dtype=torch.bool)
    for j, s in enumerate(states):
        h[j, : s.shape[0]], m[j, : s.shape[0]] = s.float(), True
    return h.to(device), m.to(device), targets[indices].to(device)


@torch.no_grad()
def _predict(head, hidden, targets, indices: list[int], batch_size: int, device) -> torch.Tensor:
    """Eval-mode squared errors of ``head`` on ``indices``."""
    head.eval()
    errs = [torch.zeros(0, device=device)]
    for i in range(0, len(indices), batch_size):
        h, m, y = _padded(hidden, targets, indices[i : i + batch_size], device)
        errs.append((head(h, m) - y) ** 2)
    return torch.cat(errs).cpu()


def _train_head(head, hidden, targets, fit: list[int], val: list[int], *, epochs: int, lr: float, batch_size: int,
                generator: torch.Generator, device, select: str) -> tuple[int, list[float]]:
    """AdamW on the MSE, ``epochs`` passes over ``fit`` in shuffled batches. ``select="best"`` keeps
    the epoch with the lowest held-out MSE on ``val`` or, when ``val`` is empty, the lowest mean
    training-batch loss of the epoch (the reference's rule); ``"last"`` the last. Returns the epoch
    kept (1-based) and each epoch's selection criterion (empty with ``"last"``)."""
    head.to(device)
    optim = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    best, best_epoch, best_state, criteria = math.inf, epochs, None, []
    for epoch in tqdm(range(1, epochs + 1), desc="A-LoL value head", leave=False):
        head.train()
        perm = torch.randperm(len(fit), generator=generator).tolist()
        losses = []
        for i in range(0, len(fit), batch_size):
            h, m, y = _padded(hidden, targets, [fit[j] for j in perm[i : i + batch_size]], device)
            loss = torch.nn.functional.mse_loss(head(h, m), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
        if select == "best":
            criterion = float(_predict(head, hidden, targets, val, batch_size, device).mean()) if val else \
                sum(losses) / len(losses)
            criteria.append(criterion)
            if criterion < best:
                best, best_epoch = criterion, epoch
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return best_epoch, criteria


def fit_value_head(head, hidden: list[torch.Tensor], targets: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                   val_fraction: float, seed: int, device, select: str = "last") -> dict:
    """MSE fit of ``head`` on per-prompt hidden states (``val_fraction`` held out; 0: every prompt is
    fit); returns the held-out MSE (eval mode) next to the MSE of predicting the fit set's mean."""
    n = len(hidden)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    val, fit = order[:n_val], order[n_val:] or order
    epoch, criteria = _train_head(head, hidden, targets, fit, val, epochs=epochs, lr=lr, batch_size=batch_size,
                        generator=generator, device=device, select=select)
    fit_mean = float(targets[fit].mean())
    return {"value_val_mse": float(_predict(head, hidden, targets, val, batch_size, device).mean()) if val else None,
            "value_fit_mse": float(_predict(head, hidden, targets, fit, batch_size, device).mean()),
            "value_rows": n, "value_val_rows": len(val),
            "value_val_mse_of_mean": float(((targets[val] - fit_mean) ** 2).mean()) if val else None,
            "value_val_method": "held_out" if val else None, "value_epoch": epoch, "value_epoch_criteria": criteria,
            "value_target_mean": float(targets.mean())}


def cross_validate_value_head(make_head, hidden: list[torch.Tensor], targets: torch.Tensor, *, folds: int,
                              epochs: int, lr: float, batch_size: int, seed: int, device, select: str = "last") -> dict:
    """``folds``-fold cross-validated MSE of the value-head recipe that fits every prompt (epoch kept
    by the training loss, as with nothing held out), next to the MSE of predicting each fold's
    training mean: how well such a head generalises, measured without taking prompts from it."""
    n = len(hidden)
    folds = min(folds, n)
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(n, generator=generator).tolist()
    errors, of_mean = [], []
    for k in range(folds):
        val = order[k::folds]
        held = set(val)
        fit = [i for i in order if i not in held]
        torch.manual_seed(seed + 1 + k)
        head = make_head()
        _train_head(head, hidden, targets, fit, [], epochs=epochs, lr=lr, batch_size=batch_size, generator=generator,
                    device=device, select=select)
        errors.append(_predict(head, hidden, targets, val, batch_size, device))
        of_mean.append((targets[val] - targets[fit].mean()) ** 2)
    return {"value_val_mse": float(torch.cat(errors).mean()), "value_val_mse_of_mean": float(torch.cat(of_mean).mean()),
            "value_val_rows": n, "value_val_method": f"{folds}-fold cross-validation"}


def fit_from_args(args, hidden: list[torch.Tensor], targets: torch.Tensor, device) -> tuple[ValueHead, dict]:
    """The head an :class:`trainers.alol.ALoLConfig` asks for, fit on per-prompt hidden states as it
    asks (held-out share, epochs, selection, optional cross-validation); the global RNG is left as it was."""
    options = dict(epochs=args.value_epochs, lr=args.value_learning_rate, batch_size=args.value_batch_size,
                   seed=args.seed, device=device, select=args.value_select)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(args.seed)
        head = ValueHead.from_args(args, hidden[0].shape[-1])
        stats = fit_value_head(head, hidden, targets, val_fraction=args.value_val_fraction, **options)
        if args.value_cv_folds and not args.value_val_fraction and len(hidden) > 1:
            stats.update(cross_validate_value_head(lambda: ValueHead.from_args(args, hidden[0].shape[-1]), hidden,
                                                   targets, folds=args.value_cv_folds, **options))
    return head, stats
