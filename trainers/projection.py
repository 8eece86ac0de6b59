"""LM-head tiles at the model's precision, and the tile sizes per device.

Every signal path (:func:`trainers.signals.token_signals`, :func:`trainers.lens.lens_readout`)
projects hidden states through the head one ``tokens x vocab`` tile at a time. :func:`project`
computes one tile ``Z = h W^T (+ b)`` as an fp32 tensor:

* **low precision** (the head is bf16/fp16, or autocast to bf16/fp16 is on): ``h`` and ``W`` are
  rounded to that dtype, the products are exact and accumulate in fp32 and the tile is *stored* in
  fp32, what ``nn.Linear`` in bf16 computes on tensor cores before it rounds its output. On CUDA
  (where torch's ``mm`` takes an ``out_dtype``) this is one bf16/fp16 tensor-core GEMM with
  ``out_dtype=torch.float32``; on other devices the same numbers come from an fp32 GEMM of the
  rounded operands (a bf16 or fp16 value is exact in fp32), so CPU tests check the GPU path's
  numerics (up to summation order);
* **fp32** (fp32 head, no low-precision autocast): an exact fp32 GEMM, as before.

Everything after the GEMM (logit transform, temperature, logsumexp, entropy, mean logit, argmax)
runs in fp32. Never rounding the *tile* to bf16 is what keeps the signals at bf16 accuracy: a bf16
logit of size 20 is off by up to 0.06, which moves a low entropy by tens of percent.

Tile sizes (:data:`CHUNKS`, :func:`default_chunks`): peak extra memory of a signal pass is about
one fp32 tile ``tokens x vocab x 4`` bytes (plus the fold's temporaries on devices without Triton).
CPU keeps small tiles (512 x 4096: 8 MiB per tile; ``benchmarks/signal_memory.py`` measures the
peak); CUDA uses larger tiles so each GEMM fills the GPU (4096 x 8192: 128 MiB per tile).
Override per call (``chunk_size``/``vocab_chunk_size``), per run (``RLIFConfig.signal_chunk_size``),
or for a whole process with the environment variables ``INTRINSIC_SIGNAL_TOKENS`` /
``INTRINSIC_SIGNAL_VOCAB`` (read at import).
"""

from __future__ import annotations

import os

import torch

__all__ = ["CHUNKS", "LOW_PRECISION", "compute_dtype", "default_chunks", "project"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

CHUNKS: dict[str, tuple[int, int]] = {"cpu": (512, 4096), "cuda": (4096, 8192), "xpu": (4096, 8192)}
"""``device type -> (tokens per tile, vocabulary rows per tile)``; other devices use ``"cpu"``'s."""

for _i, _name in enumerate(("INTRINSIC_SIGNAL_TOKENS", "INTRINSIC_SIGNAL_VOCAB")):
    if os.environ.get(_name):
        CHUNKS = {k: tuple(int(os.environ[_name]) if j == _i else v for j, v in enumerate(c)) for k, c in CHUNKS.items()}

_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


def default_chunks(device: torch.device | str) -> tuple[int, int]:
    """``(tokens, vocabulary rows)`` per projection tile on ``device`` (:data:`CHUNKS`)."""
    return CHUNKS.get(torch.device(device).type, CHUNKS["cpu"])


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's low-precision dtype if on, else the head's if low, else fp32."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in LOW_PRECISION:
        return torch.get_autocast_dtype(device)
    return weight.dtype if weight.dtype in LOW_PRECISION else torch.float32


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden (n, H) @ weight (v, H)^T + bias`` as an fp32 ``(n, v)`` tile, GEMM in ``dtype`` (module docstring).

    ``dtype`` defaults to :func:`compute_dtype` (decide it once, outside autocast-disabled regions);
    ``out`` is an optional fp32 buffer of shape ``(n, v)`` (may be a column slice of a wider one).
    """
    dtype = compute_dtype(weight) if dtype is None else dtype
    if out is None:
        out = torch.empty(hidden.shape[0], weight.shape[0], device=weight.device, dtype=torch.float32)
    h = hidden.to(device=weight.device, dtype=dtype)
    w = weight.to(dtype)
    if dtype in LOW_PRECISION and _MM_OUT_DTYPE and out.device.type == "cuda":
        torch.mm(h, w.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(h.float(), w.float().t(), out=out)
    if bias is not None:
        out.add_(bias.to(dtype).float())
    return out
