"""The project's own GPU check: accuracy through the CUDA kernel path, every recipe, the speed benchmarks.

Run through ``benchmarks/gpu_check.sh`` (which sets up the carried wheels and ``PYTHONPATH``), or
directly with the project importable. Stages (each in a subprocess with its own timeout; one
failing stage does not stop the others):

1. ``environment``: torch, CUDA device, whether TRL's Triton fold is used.
2. ``accuracy``: ``benchmarks/signal_accuracy.py`` — signals and lens vs float64 at V = 151,936
   with a tokenizer of 151,665 tokens, bf16 and fp32, three logit transforms.
3. ``pytest_gpu``: ``pytest -m gpu tests/test_gpu.py`` when pytest is importable (carry its wheel:
   ``../shared/gpu/prepare_wheels.sh pytest pytest-timeout pluggy iniconfig``), else skipped.
4. ``dry_runs``: every config's ``--dry-run`` (parallel).
5. ``tiny_e2e``: ``recipes.intuitor`` and ``recipes.rlif`` (internal consistency) on a tiny
   random model, bf16 on CUDA, a few steps.
6. ``signal_memory_1.5b`` / ``signal_memory_7b``: ``benchmarks/signal_memory.py`` at H = 1,536
   and 3,584 (V = 151,936, 3,072 tokens, bf16).
7. ``step_parts``: ``benchmarks/rlif_step_parts.py --shape 0.5b``.
8. ``decred_step``: ``benchmarks/decred_step.py --shape llm``.

The last line printed is one JSON object: per stage ``rc``, ``seconds`` and the stage's JSON
(or its last error lines), and ``ok``. Each stage has a timeout, and stages not started within
``--budget`` seconds (470) are reported as skipped, so the whole check ends in under 8 minutes
(worst case: the last stage's timeout after the budget). ``--cpu-smoke`` runs every stage at CPU sizes (tiny shapes,
two dry runs, fp32) to test the script itself without a GPU; CUDA-only checks then report
``skipped``.

    bash benchmarks/gpu_check.sh              # on the GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = "tiny://qwen2?layers=2&hidden=64&heads=4&kv_heads=2&intermediate=256"


def _last_json(text: str):
    """The last JSON object printed (a pretty-printed one spans lines: take from the last line starting '{')."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", (exc.stderr or "") + f"\ntimed out after {timeout} s"
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    result = {"rc": rc, "seconds": round(time.time() - start, 1)}
    parsed = _last_json(out)
    if parsed is not None:
        result["json"] = parsed
    if rc != 0:
        result["error_tail"] = "\n".join((err or out).strip().splitlines()[-6:])
    return result


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        import trl
        from trl.kernels.chunked_logprob import _use_triton

        info.update(trl=trl.__version__, transformers=transformers.__version__,
                    triton_fold=_use_triton(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    except ImportError as err:
        info["import_error"] = str(err)
    return {"rc": 0, "seconds": 0.0, "json": info}


def dry_runs(configs: list[Path], workers: int, timeout: int) -> dict:
    start = time.time()

    def one(path: Path):
        recipe = path.parent.name
        return str(path.relative_to(ROOT)), run([PY, "-m", f"recipes.{recipe}", "--config", str(path), "--dry-run"],
                                                timeout)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(pool.map(one, configs))
    failed = {name: r.get("error_tail", "") for name, r in results.items() if r["rc"] != 0}
    return {"rc": 1 if failed else 0, "seconds": round(time.time() - start, 1),
            "json": {"configs": len(results), "passed": len(results) - len(failed), "failed": failed}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage at CPU sizes (tests this script)")
    parser.add_argument("--only", help="comma-separated stage names")
    parser.add_argument("--workers", type=int, default=6, help="parallel dry runs")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="seconds: stages not started by then are skipped (reported), so the check ends < 8 min")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    import torch

    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        print(json.dumps({"ok": False, "error": "no CUDA device: run on a GPU machine, or use --cpu-smoke"}))
        sys.exit(2)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "INTRINSIC_CACHE": str(tmp / "cache")}
    os.environ.update(env)
    configs = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "base")
    if smoke:
        configs = [ROOT / "configs/intuitor/tiny_arithmetic.yaml", ROOT / "configs/intuitor/qwen2.5-1.5b_math.yaml"]
    precision = [] if smoke else ["model.dtype=bfloat16", "trainer.bf16=true"]
    e2e_common = [f"model.name_or_path={TINY}", "trainer.max_steps=3", "trainer.per_device_train_batch_size=16",
                  "trainer.logging_steps=1", "eval.max_rows=8", "eval.max_new_tokens=8", *precision]
    accuracy = (["--device", "cpu", "--vocab", "4096", "--tokenizer-vocab", "4000", "--hidden", "64", "--tokens", "64"]
                if smoke else [])
    memory = ["--length", "256", "--vocab", "8192"] if smoke else ["--length", "3072", "--repeats", "3"]
    parts = (["--shape", "tiny", "--steps", "4", "--warmup", "1", "--whole-runs", "0", "--reward", "self_certainty"]
             if smoke else ["--shape", "0.5b", "--steps", "6", "--warmup", "2", "--whole-runs", "0", "--reward", "self_certainty"])
    decred = ["--shape", "llm", "--steps", "2", "--batch", "2", "--seq", "32", "--repeats", "1"] if smoke else \
        ["--shape", "llm", "--repeats", "1"]
    pytest_ok = importlib.util.find_spec("pytest") is not None

    def limit(seconds: int) -> int:  # per-stage timeout; CPU smoke runs on slow, shared machines
        return seconds * 10 if smoke else seconds
    stages = {
        "environment": lambda: environment(),
        "accuracy": lambda: run([PY, "benchmarks/signal_accuracy.py", *accuracy], limit(120)),
        "pytest_gpu": lambda: (run([PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                                   limit(120)) if pytest_ok else {"rc": 0, "seconds": 0.0, "skipped": "pytest not importable"}),
        "dry_runs": lambda: dry_runs(configs, args.workers, limit(150)),
        "tiny_e2e_intuitor": lambda: run([PY, "-m", "recipes.intuitor", "--config", "configs/intuitor/tiny_arithmetic.yaml",
                                          *e2e_common, f"trainer.output_dir={tmp / 'intuitor'}"], limit(90)),
        "tiny_e2e_rlif_ic": lambda: run([PY, "-m", "recipes.rlif", "--config", "configs/rlif/tiny_arithmetic_ic.yaml",
                                         *e2e_common, f"trainer.output_dir={tmp / 'rlif_ic'}"], limit(90)),
        "signal_memory_1.5b": lambda: run([PY, "benchmarks/signal_memory.py", "--hidden", "256" if smoke else "1536",
                                           *memory, *([] if cuda else ["--device", "cpu"])], limit(60)),
        "signal_memory_7b": lambda: ({"rc": 0, "seconds": 0.0, "skipped": "CPU smoke"} if smoke else
                                     run([PY, "benchmarks/signal_memory.py", "--hidden", "3584", *memory], limit(60))),
        "step_parts": lambda: run([PY, "benchmarks/rlif_step_parts.py", *parts, *([] if cuda else ["--device", "cpu"])],
                                  limit(150)),
        "decred_step": lambda: run([PY, "benchmarks/decred_step.py", *decred], limit(120)),
    }
    chosen = args.only.split(",") if args.only else list(stages)
    unknown = set(chosen) - set(stages)
    if unknown:
        print(f"error: unknown stages {sorted(unknown)}; choose from {list(stages)}", file=sys.stderr)
        sys.exit(2)
    summary = {"mode": "cpu-smoke" if smoke else "cuda", "stages": {}}
    start = time.time()
    for name in chosen:
        if not smoke and time.time() - start > args.budget:
            summary["stages"][name] = {"rc": 0, "seconds": 0.0, "skipped": f"over the {args.budget:.0f} s budget"}
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        result = stages[name]()
        summary["stages"][name] = result
        print(f"[gpu_check] {name}: rc={result['rc']} in {result['seconds']} s", file=sys.stderr, flush=True)
    acc = summary["stages"].get("accuracy", {}).get("json")
    summary["accuracy_ok"] = bool(acc and acc.get("ok"))
    summary["seconds"] = round(time.time() - start, 1)
    summary["ok"] = all(r["rc"] == 0 for r in summary["stages"].values()) and (summary["accuracy_ok"] or
                                                                              "accuracy" not in chosen)
    print(json.dumps(summary, separators=(",", ":")))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
