"""Step time and peak memory of DeCRED fine-tuning (two auxiliary heads) vs plain SFT.

Same random-init decoder-only model, data (random tokens), config and seed; each variant runs
in its own process (variants alternate over ``--repeats`` runs; medians reported) so that its peak memory is its own (CUDA: ``max_memory_allocated``; CPU:
peak RSS, ``ru_maxrss``). Goals: time ratio <= 1.3, peak memory ratio <= 1.15. Prints JSON.

    python benchmarks/decred_step.py [--shape decred|llm] [--steps 12] [--batch 8] [--seq 256] [--repeats 3]

Shapes: ``decred`` is the paper's decoder (8 blocks, 512 wide, 5000 BPE units), ``llm`` a
large-vocabulary decoder (4 blocks, 256 wide, 32k vocabulary) where every head costs as much
as the whole body. Variants: ``plain`` (TRL SFTTrainer, fused LM head), ``separate`` (two new
linear heads after blocks L/4 and L/2, DeCRED), ``shared`` (the same layers through the final
norm + LM head, LayerSkip), and ``final_only`` (our loss path with no aux head, to separate the
heads' cost from TRL's fused-head kernel).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.tiny.tokenizer import build_char_tokenizer  # noqa: E402
from trainers.decred import DeCREDOptions, DeCREDSFTTrainer  # noqa: E402

SHAPES = {
    "decred": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=2048, vocab_size=5000),
    "llm": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=1024, vocab_size=32000),
}


class StepTimer(TrainerCallback):
    """Wall time per step and, on CPU, this process's CPU time per step (robust to other jobs
    sharing the machine, which stretch wall time but not the work done)."""

    def __init__(self):
        self.times, self.cpu, self._t = [], [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.process_time() - self._t[1])


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, shape: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(seq, 512), tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    tok = build_char_tokenizer()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(10, config.vocab_size, (batch * (steps + 1), seq), generator=g).tolist()})
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                         report_to=[], save_strategy="no", logging_steps=steps, seed=0, max_length=seq, bf16=False,
                         use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        timer = StepTimer()
        L = config.num_hidden_layers
        if variant == "plain":
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
        elif variant == "final_only":  # our loss path with no aux head: isolates the heads' cost
            trainer = DeCREDSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                       callbacks=[timer], decred=DeCREDOptions(layers=[], chunk_size=2048))
        else:
            options = DeCREDOptions(layers=[L // 4, L // 2], head=variant, weights=[0.15, 0.15, 0.7], chunk_size=2048)
            trainer = DeCREDSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                       callbacks=[timer], decred=options)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        before = peak_bytes()
        trainer.train()
        peak = peak_bytes()
    times, cpu = timer.times[2:] or timer.times, timer.cpu[2:] or timer.cpu
    return {"variant": variant, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_mb": peak / 2**20,
            "peak_before_train_mb": before / 2**20,
            "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="decred")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    parser.add_argument("--variants", default="plain,final_only,separate,shared")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.shape, a.steps, a.batch, a.seq, a.threads)))
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeats):  # variants alternate, so machine noise hits all of them alike
        for variant in a.variants.split(","):
            cmd = [sys.executable, __file__, "--child", variant, "--shape", a.shape, "--steps", str(a.steps),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.setdefault(variant, []).append(json.loads(out.strip().splitlines()[-1]))
    results = {v: {"step_s": statistics.median(r["step_s"] for r in rs), "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                   "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                   "peak_before_train_mb": rs[0]["peak_before_train_mb"], "params_m": rs[0]["params_m"],
                   "step_s_all": [round(r["step_s"], 3) for r in rs]} for v, rs in runs.items()}
    plain = results.get("plain")
    report = {"shape": a.shape, **SHAPES[a.shape], "batch": a.batch, "seq": a.seq, "steps": a.steps,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "memory": "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS",
              "runs": results}
    if plain:
        for name, r in results.items():
            if name != "plain":
                report[f"{name}_time_ratio"] = round(r["step_s"] / plain["step_s"], 3)
                if not torch.cuda.is_available():
                    report[f"{name}_cpu_time_ratio"] = round(r["cpu_s"] / plain["cpu_s"], 3)
                report[f"{name}_peak_ratio"] = round(r["peak_mb"] / plain["peak_mb"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
