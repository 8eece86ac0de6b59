"""Signals and logit-lens readout against a float64 full-softmax reference, on any device (prints JSON).

    python benchmarks/signal_accuracy.py                              # CUDA if present: V=151,936, tokenizer 151,665
    python benchmarks/signal_accuracy.py --device cpu --vocab 4096 --tokenizer-vocab 4000 --hidden 64

For each dtype (bf16, fp32) and each logit transform (none, Gemma-2-style soft-capping at 30,
Cohere-style scale 0.0625) it runs :func:`trainers.signals.token_signals` (through TRL's Triton fold
on CUDA, its torch fold elsewhere) and :func:`trainers.lens.lens_readout` on random hidden states
and a head whose logits have a standard deviation of about 3, restricted to the first
``--tokenizer-vocab`` rows (Qwen2.5 pads its head past its tokenizer), and reports the largest error
against float64 full softmax over the same (rounded) inputs. Error measure: ``|ours - ref| /
max(|ref|, 1)``. Bounds: 2e-3 for bf16 inputs, 1e-5 for fp32 (``ok`` in the JSON).
tests/test_gpu.py asserts the same on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainers.lens import lens_readout  # noqa: E402
from trainers.logit_transform import LogitTransform  # noqa: E402
from trainers.signals import token_signals  # noqa: E402

BOUNDS = {"bf16": 2e-3, "fp32": 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TRANSFORMS = {"none": LogitTransform(), "softcap30": LogitTransform(1.0, 30.0), "scale0.0625": LogitTransform(0.0625)}


def _error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((ours.double() - ref).abs() / ref.abs().clamp(min=1.0)).max())


def check(device: str, vocab: int, tokenizer_vocab: int, hidden_size: int, tokens: int, dtype: str, transform: str,
          temperature: float = 0.9, seed: int = 0) -> dict:
    """Largest errors of every signal and of the lens log-prob; argmax agreement of the lens."""
    g = torch.Generator().manual_seed(seed)
    t = TRANSFORMS[transform]
    # logit scale 0.0625 needs raw logits 16x larger for the same distribution
    spread = 3.0 / (t.scale if t.scale != 1.0 else 1.0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(DTYPES[dtype]).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * spread / math.sqrt(hidden_size)).to(DTYPES[dtype]).to(device)
    targets = torch.randint(0, tokenizer_vocab, (tokens,), generator=g).to(device)
    out = token_signals(hidden, weight, targets, temperature=temperature, signals=("logps", "entropy", "self_certainty"),
                        vocab_size=tokenizer_vocab, **t.kwargs())
    z = hidden.double() @ weight[:tokenizer_vocab].double().T
    z = z * t.scale
    if t.softcap is not None:
        z = t.softcap * torch.tanh(z / t.softcap)
    logp = (z / temperature).log_softmax(-1)
    ref = {"logps": logp.gather(-1, targets[:, None])[:, 0], "entropy": -(logp.exp() * logp).sum(-1),
           "self_certainty": -logp.mean(-1) - math.log(tokenizer_vocab)}
    errors = {name: _error(out[name], ref[name]) for name in ref}
    lens = lens_readout(hidden[None], torch.nn.Identity(), weight, None, targets, vocab_size=tokenizer_vocab,
                        transform=t)
    lens_logp = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    errors["lens_logp"] = _error(lens["logp"][:, 0], lens_logp)
    top = z.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-3 * top[:, 0].abs().clamp(min=1)  # ties within rounding may flip
    agree = (lens["argmax"][:, 0] == z.argmax(-1)) | ~clear
    del z, logp
    bound = BOUNDS[dtype]
    return {"dtype": dtype, "transform": transform, "errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
            "lens_argmax_agreement": float(agree.float().mean()), "bound": bound,
            "ok": max(errors.values()) <= bound and bool(agree.all())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=151_936, help="LM head rows")
    parser.add_argument("--tokenizer-vocab", type=int, default=151_665, help="tokens (signals use these rows)")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from trl.kernels.chunked_logprob import _use_triton

    results = [check(args.device, args.vocab, args.tokenizer_vocab, args.hidden, args.tokens, dtype, transform)
               for dtype in DTYPES for transform in TRANSFORMS]
    print(json.dumps({"device": args.device, "fold": "triton" if _use_triton(torch.device(args.device)) else "torch",
                      "vocab": args.vocab, "tokenizer_vocab": args.tokenizer_vocab, "hidden": args.hidden,
                      "tokens": args.tokens, "results": results, "ok": all(r["ok"] for r in results)}, indent=2))


if __name__ == "__main__":
    main()
