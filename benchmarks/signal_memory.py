"""Peak memory and wall time of per-token self-certainty: chunked (ours) vs full logits (naive).

    python benchmarks/signal_memory.py                      # Qwen2.5-1.5B shape: V=151,936, H=1,536, L=3,072
    python benchmarks/signal_memory.py --length 512         # quick check
    python benchmarks/signal_memory.py --batch 2 --dtype fp32
    python benchmarks/signal_memory.py --hidden 3584          # Qwen2.5-7B's head shape

Prints one JSON object. Both methods compute ``sc_t = logsumexp(z_t/T) - mean_j(z_t/T) - log V`` for
every token of a ``(batch, length)`` completion from its final hidden states and the LM head:

- ``ours``: ``trainers.signals.token_signals`` (token chunks x vocabulary tiles; the GEMM at the
  inputs' precision with an fp32 tile, fp32 reductions; no ``(B, L, V)`` tensor);
- ``naive``: what the Intuitor reference code does, ``logits = lm_head(hidden).float() / T``,
  ``log_softmax`` over the full ``(B, L, V)`` logits, ``-mean(log p) - log V``.

How peak memory is measured (the number reported is *extra* memory above the inputs, i.e. the
hidden states and the head weight, which both methods share):

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocated bytes before the call. Exact for tensors, independent of the caching allocator.
- CPU: PyTorch has no allocator statistics on CPU, tracemalloc does not see its allocations and
  sampling RSS misses short-lived peaks. We use the kernel's own high-water mark instead: each
  method runs in a fresh subprocess (so no memory freed by the other method can be reused or
  hidden), builds its inputs, resets the high-water mark (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0), runs once, and reports ``VmHWM - VmRSS(before)`` from ``/proc/self/status``.
  Every page a tensor touches counts, so this is the true peak of live memory plus allocator
  slack, never an underestimate from sampling. When ``clear_refs`` cannot be written, the
  fallback is ``ru_maxrss`` after minus the ``VmHWM`` before the call (reported as ``"method"``).

Wall time is one timed run per method after nothing else (a warm-up would pollute the CPU peak);
use ``--repeats`` for more timed runs (the peak is taken over the first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PeakMeter:
    """Extra peak memory (bytes) of the code run inside the ``with`` block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = _status_kib("VmRSS") * 1024
                self.method = "VmHWM after clear_refs=5, fresh process"
                self._reset = True
            except OSError:
                self.base = _status_kib("VmHWM") * 1024
                self.method = "ru_maxrss delta, fresh process (clear_refs unavailable)"
                self._reset = False
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._reset:
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(peak - self.base, 0)
        return False


def _naive(hidden, weight, temperature):
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight).float() / temperature  # (B, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.mean(-1) - math.log(weight.shape[0])


def _token_signals():
    root = str(Path(__file__).resolve().parents[1])  # this checkout first, even if another one is installed
    if sys.path[0] != root:
        sys.path.insert(0, root)
    from trainers.signals import token_signals

    return token_signals


def _ours(hidden, weight, temperature, chunk_size, vocab_chunk_size):
    import torch

    targets = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    out = _token_signals()(
        hidden,
        weight,
        targets,
        temperature=temperature,
        signals=("self_certainty",),
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    return out["self_certainty"]


def _worker(args) -> dict:
    import torch

    if args.method == "ours":  # imports stay outside the measured block
        _token_signals()
        import trl.kernels  # noqa: F401
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    # logits with a standard deviation of about 2, like a trained LM head
    hidden = torch.randn(args.batch, args.length, args.hidden, generator=g, dtype=dtype).to(device)
    weight = (torch.randn(args.vocab, args.hidden, generator=g, dtype=dtype) * (2 / math.sqrt(args.hidden))).to(device)

    def run():
        with torch.no_grad():
            if args.method == "naive":
                return _naive(hidden, weight, args.temperature)
            return _ours(hidden, weight, args.temperature, args.chunk_size, args.vocab_chunk_size)

    times = []
    with _PeakMeter(device) as meter:
        start = time.perf_counter()
        sc = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        sc = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    torch.save(sc.float().cpu(), args.out)
    return {
        "peak_extra_bytes": meter.peak_bytes,
        "wall_s": min(times),
        "wall_s_all": [round(t, 3) for t in times],
        "memory_method": meter.method,
        "mean_self_certainty": sc.float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=3072, help="completion tokens per sequence")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="hidden states and head")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--chunk-size", type=int, help="ours: tokens per chunk (default: token_signals' default)")
    parser.add_argument(
        "--vocab-chunk-size", type=int, help="ours: vocabulary rows per tile, 0 = all (default: token_signals' default)"
    )
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (wall_s is the fastest)")
    parser.add_argument("--methods", default="ours,naive")
    parser.add_argument("--_worker", dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--_out", dest="out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _token_signals()  # puts the repository root on sys.path when run as a script
    from trainers.projection import default_chunks

    tokens, cols = default_chunks(args.device)  # token_signals' per-device defaults
    if args.chunk_size is None:
        args.chunk_size = tokens
    if args.vocab_chunk_size is None:
        args.vocab_chunk_size = cols
    args.vocab_chunk_size = args.vocab_chunk_size or None

    if args.method:
        print(json.dumps(_worker(args)))
        return

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{method}.pt")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *sys.argv[1:],
                f"--chunk-size={args.chunk_size}",
                f"--vocab-chunk-size={args.vocab_chunk_size or 0}",
                f"--_worker={method}",
                f"--_out={out}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{method} worker failed:\n{proc.stderr[-4000:]}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[method]["sc"] = torch.load(out)
    report = {
        "problem": {
            "batch": args.batch,
            "length": args.length,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "temperature": args.temperature,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "full_logits_fp32_bytes": args.batch * args.length * args.vocab * 4,
        },
        "ours_settings": {"chunk_size": args.chunk_size, "vocab_chunk_size": args.vocab_chunk_size},
    }
    for method, res in results.items():
        report[method] = {
            "peak_extra_bytes": res["peak_extra_bytes"],
            "peak_extra_mib": round(res["peak_extra_bytes"] / 2**20, 1),
            "wall_s": round(res["wall_s"], 3),
            "wall_s_all": res["wall_s_all"],
            "mean_self_certainty": round(res["mean_self_certainty"], 6),
            "memory_method": res["memory_method"],
        }
    if "ours" in results and "naive" in results:
        ours, naive = results["ours"], results["naive"]
        report["peak_ratio_naive_over_ours"] = round(naive["peak_extra_bytes"] / max(ours["peak_extra_bytes"], 1), 2)
        report["time_ratio_ours_over_naive"] = round(ours["wall_s"] / naive["wall_s"], 3)
        report["max_abs_diff_self_certainty"] = (ours["sc"] - naive["sc"]).abs().max().item()
        report["goal_20x_lower_peak_met"] = report["peak_ratio_naive_over_ours"] >= 20
    print(json.dumps(report, indent=2))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    main()
