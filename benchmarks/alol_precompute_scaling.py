"""Wall time of A-LoL's one-off precompute on 1 vs 2 processes (the work is sharded over ranks).

Runs ``recipes.alol`` under ``accelerate launch`` (``launch/accelerate/single.yaml`` or
``ddp.yaml``) on generated (prompt, response) pairs with an empty cache, once per setting, and
reads the precompute's own timing (``precompute_seconds`` in ``alol_precompute.json``: rewards,
value-head answers and fit, reference pass and the merge, as seen by the main process). Settings:
1 process x 1 thread, 2 processes x 1 thread (same per-worker compute, twice the workers) and
1 process x 2 threads (the same cores, used by one process). Prints JSON.

    python benchmarks/alol_precompute_scaling.py [--rows 2000] [--value-rows 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from alol_step_time import rows  # noqa: E402  (the step-time benchmark's pairs: half right, half wrong)

SETTINGS = {"1proc_1thread": ("single", 1, 1), "2proc_1thread": ("ddp", 2, 1), "1proc_2threads": ("single", 1, 2)}


def launch(setting: str, data: Path, model: str, value_rows: int, out: Path) -> dict:
    engine, processes, threads = SETTINGS[setting]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / f"{engine}.yaml"), "--num_processes", str(processes),
           "--num_cpu_threads_per_process", str(threads), "-m", "recipes.alol",
           "--config", str(ROOT / "configs" / "alol" / "tiny_arithmetic.yaml"),
           f"model.name_or_path={model}", f"data.path={data}", "data.eval_split=null", "value_split=train",
           f"value_rows={value_rows}", "variants=[]", "trainer.max_steps=1", "trainer.max_length=256",
           "trainer.value_epochs=3", "trainer.value_max_new_tokens=16", "trainer.precompute_batch_size=64",
           f"trainer.output_dir={out}", f"trainer.alol_cache_dir={out / 'cache'}", "eval.before_training=false"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "alol_precompute.json").read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--value-rows", type=int, default=200)
    parser.add_argument("--words", type=int, default=24, help="filler words per response (response length)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="tiny://qwen2?layers=4&hidden=256&intermediate=1024")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
    split: dict[str, list[int]] = {}
    phases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("\n".join(json.dumps({"question": r["prompt"], "answer": r["answer"], "completion": r["completion"]})
                                  for r in rows(args.rows, args.words)))
        for repeat in range(args.repeats):  # settings alternate, so drift hits each alike
            for setting in SETTINGS:
                stats = launch(setting, data, args.model, args.value_rows, Path(tmp) / f"{setting}_{repeat}")
                assert not stats["loaded_from_cache"]
                seconds[setting].append(stats["precompute_seconds"])
                split[setting] = stats["rows_per_process"]
                phases[setting] = stats["precompute_phase_seconds"]
    median = {s: statistics.median(v) for s, v in seconds.items()}
    print(json.dumps({
        "model": args.model, "rows": args.rows, "value_rows": args.value_rows, "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "precompute_s": seconds, "median_s": median, "rows_per_process": split,
        "phase_s_last_repeat": phases,
        "speedup_2proc_vs_1proc_1thread": median["1proc_1thread"] / median["2proc_1thread"],
        "speedup_2proc_vs_1proc_2threads": median["1proc_2threads"] / median["2proc_1thread"],
    }, indent=2))


if __name__ == "__main__":
    main()
