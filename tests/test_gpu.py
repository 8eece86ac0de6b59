"""CUDA checks (marker ``gpu``; skipped without CUDA): the paths CPU tests can only emulate.

Run on a GPU machine with ``pytest -m gpu tests/test_gpu.py`` or through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]


def _accuracy():
    spec = importlib.util.spec_from_file_location("signal_accuracy", ROOT / "benchmarks" / "signal_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("transform", ["none", "softcap30", "scale0.0625"])
def test_signals_and_lens_through_the_cuda_kernel_match_float64(dtype, transform):
    """V = 151,936 head rows, 151,665 tokenizer tokens (Qwen2.5), TRL's Triton fold."""
    from trl.kernels.chunked_logprob import _use_triton

    assert _use_triton(torch.device("cuda"))
    result = _accuracy().check("cuda", 151_936, 151_665, 896, 512, dtype, transform)
    assert result["ok"], result


def test_bf16_tile_is_a_tensor_core_gemm_with_fp32_output():
    from trainers.projection import project

    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 896, generator=g).bfloat16().cuda()
    w = torch.randn(4096, 896, generator=g).bfloat16().cuda()
    tile = project(h, w)
    assert tile.dtype == torch.float32
    want = h.double() @ w.double().T
    assert float((tile.double() - want).abs().max()) < 1e-3 * float(want.abs().max())
    assert not torch.equal(tile, (h @ w.T).float())  # not nn.Linear's bf16-rounded output


def test_gpu_and_cpu_signals_agree():
    from trainers.signals import token_signals

    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 128, generator=g).bfloat16()
    w = (torch.randn(5000, 128, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, 5000, (300,), generator=g)
    names = ("logps", "entropy", "self_certainty")
    cpu = token_signals(h, w, y, signals=names)
    gpu = token_signals(h.cuda(), w.cuda(), y.cuda(), signals=names)
    for name in names:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-4)
