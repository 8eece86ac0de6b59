"""CLUE's hidden-state delta, read with the logit lens's hooks in the pass that runs anyway.

For a trace (prompt + completion) and decoder layer ``l`` (1-based ``hidden_states`` index: the
output of decoder layer ``l``, final-normed for the last layer, as transformers returns it)::

    hidden_delta[l] = h^l(end) - h^l(start)                     (K x H per completion)

Positions (CLUE, Liang et al. 2025: the hidden states at the last token of ``<think>`` and of
``</think>``), in the completion:

* ``start``: the last token of the first ``<think>`` in the completion, else the last prompt token
  (templates that open the reasoning block in the prompt end it with ``<think>``; without a block
  the whole completion is the reasoning);
* ``end``: the last token of the first ``</think>`` after it, else the completion's last token
  (EOS when it finished).

How it is read: :class:`trainers.lens.LogitLens` forward hooks on the chosen decoder layers copy
the two rows per completion (``2 x K x H`` numbers, never the full hidden states) during a
no-grad forward (:func:`trainers.signals.token_signal_dicts`, or the RLIF trainer's scoring pass);
the last layer is passed through the model's final norm, as in ``output_hidden_states``.
A completion with no token gets NaN (never scored).

>>> import torch
>>> from transformers import Qwen2Config, Qwen2ForCausalLM
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
...                                      num_attention_heads=2, num_key_value_heads=1)).eval()
>>> reader = HiddenDelta(model)                  # every layer
>>> reader.layers
[1, 2, 3]
>>> ids = torch.randint(0, 40, (2, 7))           # prompt of 4 tokens, completion of 3 (TRL's layout)
>>> reader.arm([(0, 3), (0, 2)], completion_length=3)
>>> with torch.no_grad():
...     _ = model(ids)
>>> reader.collect().shape
torch.Size([2, 3, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .lens import LogitLens, lens_modules

__all__ = ["HiddenDelta", "reasoning_positions", "think_positions"]

OPEN, CLOSE = "<think>", "</think>"


def think_positions(pieces: Sequence[str], opening: str = OPEN, closing: str = CLOSE) -> tuple[int, int]:
    """``(start, end)`` lens indices of one completion given its tokens' texts (``pieces``).

    Lens index ``t`` is the position that predicts completion token ``t``, i.e. completion token
    ``t - 1`` (``t = 0``: the last prompt token). ``start`` = 1 + the token ending the first
    ``opening`` (else 0); ``end`` = 1 + the token ending the first ``closing`` after it, else
    ``len(pieces)`` (the last completion token).

    >>> think_positions(["<think>", "2+2", "=4", "</think>", "4", "<eos>"])
    (1, 4)
    >>> think_positions(["2", "+", "2", "=4"]), think_positions([])
    ((0, 4), (0, 0))
    """
    text = "".join(pieces)
    ends, position = [], 0
    for piece in pieces:
        position += len(piece)
        ends.append(position)

    def token_ending(char_end: int) -> int:  # the token holding character char_end - 1
        return next(i for i, e in enumerate(ends) if e >= char_end)

    start, search_from = 0, 0
    found = text.find(opening)
    if found >= 0:
        start, search_from = token_ending(found + len(opening)) + 1, found + len(opening)
    found = text.find(closing, search_from)
    end = token_ending(found + len(closing)) + 1 if found >= 0 else len(pieces)
    return start, max(end, start)


def reasoning_positions(tokenizer, completion_ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """:func:`think_positions` of every completion (tokens decoded one by one, special tokens kept as text)."""
    out = []
    for ids in completion_ids:
        ids = [int(t) for t in ids]
        pieces = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False) if ids else []
        out.append(think_positions(pieces))
    return out


class HiddenDelta:
    """Hooks that read ``h^l(end) - h^l(start)`` per completion (module docstring).

    ``layers``: 1-based decoder layers (``None``: all). :meth:`arm` with one ``(start, end)`` lens
    index pair per row before a no-grad forward (or consecutive micro-batch forwards over the rows
    in order), :meth:`collect` after: ``(N, K, H)`` float32 on the CPU.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None):
        n = len(lens_modules(model)[0])
        self.layers = list(range(1, n + 1)) if layers is None else sorted({int(layer) for layer in layers})
        self._lens = LogitLens(model, self.layers)  # hooks; it adds the last layer, read but dropped if not asked
        self._empty: list[bool] = []

    @property
    def armed(self) -> bool:
        return self._lens.armed

    def arm(self, positions: Sequence[tuple[int, int]], completion_length: int) -> None:
        self._empty = [start == end == 0 for start, end in positions]
        self._lens.arm([[start, end] for start, end in positions], completion_length)

    def disarm(self) -> None:
        self._lens.disarm()

    def remove(self) -> None:
        self._lens.remove()

    def collect(self) -> torch.Tensor:
        """Disarm; ``(N, K, H)`` deltas (NaN for completions without tokens)."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        states, _ = self._lens.collect()  # (K', 2N, H): start, end of each row in turn
        read = self._lens.layers
        if read[-1] in self.layers:  # hidden_states[L] is final-normed
            norm = self._lens.norm
            dtype = next(norm.parameters(), states).dtype
            with torch.no_grad(), maybe_gather_lm_head_ctx(*norm.parameters()):
                last = norm(states[-1].to(dtype)).to(states.dtype)
            states = torch.cat([states[:-1], last[None]])
        states = states[[read.index(layer) for layer in self.layers]].float()
        deltas = (states[:, 1::2] - states[:, 0::2]).transpose(0, 1).cpu()
        if any(self._empty):
            deltas[torch.tensor(self._empty)] = float("nan")
        return deltas
