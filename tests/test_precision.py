"""Signals at the model's precision: bf16/fp16 GEMM with an fp32 tile, fp32 reductions (trainers/projection.py).

On CPU the low-precision GEMM is emulated exactly (operands rounded to bf16, products exact in fp32,
fp32 accumulation), so these tests check the numerics the CUDA path computes; tests/test_gpu.py runs
the CUDA path itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers import projection
from trainers.lens import lens_readout
from trainers.signals import token_signals

V, H, N = 3000, 64, 96
NAMES = ("logps", "entropy", "self_certainty")


def _inputs(dtype, seed=0, spread=1.0):
    """Hidden states and a head whose logits span tens of units (peaked and flat tokens alike)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g) * torch.linspace(0.2, spread, N)[:, None]
    weight = torch.randn(V, H, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets


def _reference(hidden, weight, bias, targets, temperature=0.8):
    """float64 full softmax of the *given* values (bf16 inputs upcast exactly)."""
    z = (hidden.double() @ weight.double().T + bias.double()) / temperature
    logp = z.log_softmax(-1)
    return {"logps": logp.gather(-1, targets[:, None])[:, 0], "entropy": -(logp.exp() * logp).sum(-1),
            "self_certainty": -logp.mean(-1) - math.log(V)}


def _relative_error(ours, ref):
    """``max |ours - ref| / max(|ref|, 1)``: relative above 1 nat, absolute below (an entropy of 2e-4 nats is
    ``logsumexp(z) - E_p[z]`` of two numbers of size ~|z|, so fp32 itself leaves ~1e-6 absolute there)."""
    return float(((ours.double() - ref).abs() / ref.abs().clamp(min=1.0)).max())


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2e-3), (torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_signals_against_float64(dtype, bound):
    hidden, weight, bias, targets = _inputs(dtype)
    out = token_signals(hidden, weight, targets, bias=bias, temperature=0.8, signals=NAMES, chunk_size=40,
                        vocab_chunk_size=700)
    ref = _reference(hidden, weight, bias, targets)
    assert ref["entropy"].min() < 0.5 < ref["entropy"].max()  # peaked and flat tokens both present
    for name in ("entropy", "self_certainty"):
        assert _relative_error(out[name], ref[name]) <= bound, name
    torch.testing.assert_close(out["logps"].double(), ref["logps"], rtol=bound, atol=bound)
    if dtype == torch.float32:  # the fp32 path is unchanged: bit for bit TRL's fp32 ChunkedLogProbFunction
        from trl.kernels import ChunkedLogProbFunction

        logps, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.8, 700, None, 1.0,
                                                          ("entropy",))
        torch.testing.assert_close(out["logps"], logps, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["entropy"], entropy, rtol=0, atol=1e-6)


def test_a_bf16_tile_would_break_the_bound():
    """The control: rounding each logit tile to bf16 (TRL's forward stores a bf16 model's tile in bf16) is off by far more."""
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, bias, targets = _inputs(torch.bfloat16)
    ref = _reference(hidden, weight, bias, targets)
    with torch.no_grad():
        _, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.8, 700, None, 1.0, ("entropy",))
    assert _relative_error(entropy, ref["entropy"]) > 1e-2


def test_project_is_the_low_precision_gemm_with_an_fp32_tile():
    hidden, weight, bias, _ = _inputs(torch.float32)
    # bf16 head: operands rounded to bf16, exact products, fp32 output (never rounded to bf16)
    tile = projection.project(hidden, weight.bfloat16(), bias.bfloat16())
    want = hidden.bfloat16().double() @ weight.bfloat16().double().T + bias.bfloat16().double()
    assert tile.dtype == torch.float32
    torch.testing.assert_close(tile.double(), want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(tile, tile.bfloat16().float())
    # fp32 head: exact fp32, hidden not rounded
    torch.testing.assert_close(projection.project(hidden, weight, bias).double(),
                               hidden.double() @ weight.double().T + bias.double(), rtol=1e-6, atol=1e-5)
    # low-precision autocast with an fp32 head (mixed-precision training): the GEMM runs in autocast's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert projection.compute_dtype(weight) == torch.bfloat16
    assert projection.compute_dtype(weight) == torch.float32
    assert projection.compute_dtype(weight.half()) == torch.float16


def test_lens_readout_at_bf16_against_float64():
    hidden, weight, bias, targets = _inputs(torch.bfloat16)
    norm = torch.nn.Identity()
    stats = lens_readout(hidden[None], norm, weight, bias, targets, token_chunk=32, vocab_chunk=512)
    z = hidden.double() @ weight.double().T + bias.double()
    want = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(stats["logp"][:, 0].double(), want, rtol=2e-3, atol=2e-3)
    assert stats["argmax"][:, 0].tolist() == z.argmax(-1).tolist()


def test_chunk_defaults_are_per_device():
    assert projection.default_chunks("cpu") == projection.CHUNKS["cpu"] == (512, 4096)
    assert projection.default_chunks("cuda") == projection.CHUNKS["cuda"] == (4096, 8192)
    assert projection.default_chunks("meta") == projection.CHUNKS["cpu"]
    hidden, weight, bias, targets = _inputs(torch.float32)
    default = token_signals(hidden, weight, targets, bias=bias, signals=NAMES)
    explicit = token_signals(hidden, weight, targets, bias=bias, signals=NAMES, chunk_size=512, vocab_chunk_size=4096)
    for name in NAMES:
        torch.testing.assert_close(default[name], explicit[name], rtol=0, atol=0)
