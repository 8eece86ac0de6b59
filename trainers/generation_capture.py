"""Hidden states of HF generation, one row per decoding step: signals without a second forward.

With HF ``generate`` and a KV cache, forward ``s`` of a batch of left-padded prompts (width
``P``) sees ``(B, P)`` tokens at ``s = 0`` (the prefill) and ``(B, 1)`` tokens after; its last
position is the state that predicts generated token ``s``. That is the state a teacher-forced pass
over ``prompt + completion`` has at position ``P - 1 + s``: same tokens, same attention (the
prompt padding is masked in both), so the two differ only by floating-point rounding (the cache
path sums in another order). One caveat: generation numbers a left-padded row's positions from
its first real token, the teacher-forced pass from the padding; rotary embeddings see positions
only through their differences, so this changes nothing there, but absolute position embeddings
would see other positions (:func:`rotary_positions` checks). :class:`StepStates` keeps these
rows in one ``(B, max_steps, H)`` buffer, filled by a forward hook; the signals and the logit
lens then read it exactly as they read the extra pass's states (``trainers/rlif.py``).

Memory: ``(1 + K) x B x max_steps x H`` elements of the model's dtype for the final states and
``K`` lens layers, held from generation until the rewards are computed. :func:`capture_budget`
(``INTRINSIC_GENERATION_CAPTURE_MIB``, default 2048 MiB per process; ``0`` turns capture off)
bounds it; above it RLIF runs its extra no-grad pass instead.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEFAULT_CAPTURE_MIB", "StepStates", "capture_budget", "capture_bytes", "rotary_positions", "step_mask"]

DEFAULT_CAPTURE_MIB = 2048
"""Default bound on the generation capture per process (:func:`capture_budget`)."""


def capture_budget() -> int:
    """Bytes the generation capture may hold per process: ``INTRINSIC_GENERATION_CAPTURE_MIB`` MiB (default 2048)."""
    value = os.environ.get("INTRINSIC_GENERATION_CAPTURE_MIB", "").strip()
    return int(float(value) * 2**20) if value else DEFAULT_CAPTURE_MIB * 2**20


def capture_bytes(rows: int, max_steps: int, hidden_size: int, layers: int, itemsize: int) -> int:
    """Worst-case bytes of ``layers`` buffers of ``rows x max_steps x hidden_size`` elements.

    >>> capture_bytes(16, 256, 896, layers=1 + 13, itemsize=2) / 2**20
    98.0
    """
    return rows * max_steps * hidden_size * layers * itemsize


_ABSOLUTE = ("wpe", "embed_positions", "position_embeddings", "pos_emb")


def rotary_positions(model: torch.nn.Module) -> bool:
    """Whether ``model`` encodes positions with rotary embeddings only (a ``*RotaryEmbedding`` module and no
    absolute position table: ``wpe`` / ``embed_positions`` / ``position_embeddings`` / ``pos_emb`` embeddings).

    >>> from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
    >>> rotary_positions(Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32,
    ...                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
    True
    >>> rotary_positions(GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2)))
    False
    """
    rotary = absolute = False
    for name, module in model.named_modules():
        rotary |= type(module).__name__.endswith("RotaryEmbedding")
        absolute |= name.rsplit(".", 1)[-1] in _ABSOLUTE and isinstance(module, torch.nn.Embedding)
    return rotary and not absolute


def step_mask(lengths, steps: int, device=None) -> torch.Tensor:
    """``(B, steps)`` bool: ``mask[i, s] = s < lengths[i]`` (the generated tokens a completion keeps).

    >>> step_mask([2, 0, 3], 3).int().tolist()
    [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    """
    lengths = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
    return torch.arange(steps, device=device)[None, :] < lengths[:, None]


class StepStates:
    """The last-position state of each forward of one generation, in a ``(rows, max_steps, H)`` buffer.

    :meth:`add` takes a forward's ``(rows, L, H)`` states: the first must have ``L = prompt_width``
    (the prefill), every later one ``L = 1`` (one decoding step). Anything else (another batch,
    a chunked prefill, a second generation) marks the capture failed (:attr:`failed` says why) and
    nothing more is stored. Forwards past ``max_steps`` (ZeRO-3's synchronised steps after every
    row finished) are ignored.

    >>> s = StepStates(rows=2, max_steps=3, prompt_width=4)
    >>> s.add(torch.arange(2 * 4 * 1.0).view(2, 4, 1)); s.add(torch.full((2, 1, 1), 9.0))
    >>> s.steps, s.failed, s.states()[:, :, 0].tolist()
    (2, None, [[3.0, 9.0], [7.0, 9.0]])
    >>> s.add(torch.zeros(2, 2, 1)); s.failed
    'forward 2 saw 2 new positions, expected 1 (one decoding step)'
    """

    def __init__(self, rows: int, max_steps: int, prompt_width: int):
        self.rows, self.max_steps, self.prompt_width = rows, max_steps, prompt_width
        self.buffer: torch.Tensor | None = None
        self.steps, self.failed = 0, None

    def add(self, hidden: torch.Tensor) -> None:
        if self.failed is not None or self.steps >= self.max_steps:
            return
        expected = self.prompt_width if self.steps == 0 else 1
        if hidden.shape[0] != self.rows or hidden.shape[1] != expected:
            what = "the prefill" if self.steps == 0 else "one decoding step"
            self.failed = (f"forward {self.steps} saw {hidden.shape[1]} new positions, expected {expected} ({what})"
                           if hidden.shape[0] == self.rows else
                           f"forward {self.steps} saw {hidden.shape[0]} rows, expected {self.rows}")
            self.buffer = None
            return
        if self.buffer is None:
            self.buffer = hidden.new_empty(self.rows, self.max_steps, hidden.shape[-1])
        self.buffer[:, self.steps] = hidden[:, -1].detach()
        self.steps += 1

    def states(self) -> torch.Tensor:
        """``(rows, steps, H)``: row ``i``, step ``s`` predicts generated token ``s`` of row ``i``."""
        if self.failed is not None:
            raise RuntimeError(f"generation capture failed: {self.failed}")
        if self.buffer is None:
            raise RuntimeError("generation capture saw no forward")
        return self.buffer[:, : self.steps]

    def gather(self, indices) -> torch.Tensor:
        """``(N, H)``: the states predicting tokens ``indices[i]`` of each row ``i``, rows in order."""
        states = self.states()
        r = torch.tensor([i for i, idx in enumerate(indices) for _ in idx], dtype=torch.long, device=states.device)
        s = torch.tensor([t for idx in indices for t in idx], dtype=torch.long, device=states.device)
        return states[r, s]
