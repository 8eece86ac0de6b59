"""Step time and peak memory of DeCRED fine-tuning (two auxiliary heads) vs plain SFT.

Same random-init decoder-only model, data (random tokens), config and seed; each variant runs
in its own process (variants alternate over ``--repeats`` runs; medians reported) so that its peak memory is its own (CUDA: ``max_memory_allocated``; CPU:
peak RSS, ``ru_maxrss``). Goals: time ratio <= 1.3, peak memory ratio <= 1.15. Prints JSON.

    python benchmarks/decred_step.py [--shape decred|llm] [--steps 12] [--batch 8] [--seq 256] [--repeats 3] [--parts]

Shapes: ``decred`` is the paper's decoder (8 blocks, 512 wide, 5000 BPE units), ``llm`` a
large-vocabulary decoder (4 blocks, 256 wide, 32k vocabulary) where every head costs as much
as the whole body. Variants: ``plain`` (TRL SFTTrainer, fused LM head), ``separate`` (two new
linear heads after blocks L/4 and L/2, DeCRED), ``shared`` (the same layers through the final
norm + LM head, LayerSkip), and ``final_only`` (our loss path with no aux head, to separate the
heads' cost from TRL's fused-head kernel).

``--parts`` times the pieces of a step in one process instead (process CPU time, median of
``--repeats`` alternating rounds; less noisy on a shared machine than whole runs): the body's
forward + backward, TRL's fused LM head (what plain SFT pays for its head), one head through our
fused chunked CE (forward, backward) and through the previous path (``chunked_head_loss``:
chunks under activation checkpointing, so the backward recomputes each projection), the
optimizer step, and whole ``training_step`` + optimizer step of plain SFT and of DeCRED (separate,
shared), each with the fused CE and with the checkpointed fallback; then, in fresh processes, the
peak RSS one head's CE adds (fused, checkpointed, TRL's head).
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

from recipes.common.tiny.tokenizer import build_char_tokenizer  # noqa: E402
from trainers.decred import DeCREDOptions, DeCREDSFTTrainer, chunked_head_loss, fused_heads_ce  # noqa: E402

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


def _cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def head_peak(which: str, shape: str, batch: int, seq: int) -> float:
    """MiB of peak RSS one head's CE (forward + backward, random rows) adds in a fresh process."""
    from trl.kernels import ChunkedLogProbFunction

    torch.set_num_threads(1)
    V, H = SHAPES[shape]["vocab_size"], SHAPES[shape]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch * (seq - 1), H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (batch * (seq - 1),), generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        if which == "fused":
            loss = fused_heads_ce([hidden], head.weight, None, labels, [1.0], 0.0, 2048)[0]
        elif which == "checkpoint":
            loss = chunked_head_loss(hidden, labels, head, 0.0, 2048)[0]
        else:  # plain SFT's head: TRL's fused kernel with SFT's outputs
            loss = -ChunkedLogProbFunction.apply(hidden, head.weight, None, labels, 1.0, 32768, None, 1.0,
                                                 ("log_probs", "entropy", "is_top1"))[0].sum()
        loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def parts(shape: str, batch: int, seq: int, threads: int, repeats: int) -> dict:
    """Median process CPU time (s) of each piece of a step, pieces alternating over ``repeats`` rounds."""
    if threads:
        torch.set_num_threads(threads)
    from trl.kernels import ChunkedLogProbFunction

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(seq, 512), tie_word_embeddings=False)
    L, V = config.num_hidden_layers, config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    tok = build_char_tokenizer()
    data = Dataset.from_dict({"input_ids": ids.tolist()})

    def trainer(variant):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, report_to=[], bf16=False,
                         use_cpu=True, max_length=seq, save_strategy="no")
        if variant == "plain":
            t = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        else:
            head, fused = variant.split("_")
            options = DeCREDOptions(layers=[L // 4, L // 2], head=head, weights=[0.15, 0.15, 0.7], chunk_size=2048)
            t = DeCREDSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, decred=options)
            if fused == "checkpoint":  # the previous path: every head through chunked_head_loss
                t.decred._projection = lambda layer: None
        t.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
        t.bench_optimizer = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad], lr=1e-5)
        return t

    def step(t):
        t.training_step(t.model, dict(inputs))
        t.bench_optimizer.step()
        t.bench_optimizer.zero_grad(set_to_none=True)

    trainers = {v: trainer(v) for v in ("plain", "separate_fused", "shared_fused", "separate_checkpoint",
                                        "shared_checkpoint")}
    plain = trainers["plain"]
    body = plain.model.model
    lm = plain.model.lm_head
    head = torch.nn.Linear(config.hidden_size, V, bias=False)
    labels = ids[:, 1:].reshape(-1)
    hidden = torch.randn(labels.shape[0], config.hidden_size, generator=g, requires_grad=True)
    grad_probe = torch.randn(batch, seq, config.hidden_size, generator=g)

    def body_pass():
        (body(input_ids=ids).last_hidden_state * grad_probe).sum().backward()

    def trl_head():
        out = ChunkedLogProbFunction.apply(hidden, lm.weight, None, labels, 1.0, 32768, None, 1.0,
                                           ("log_probs", "entropy", "is_top1"))
        (-out[0].sum()).backward()

    fused_out = {}

    def fused_forward():
        fused_out["loss"] = fused_heads_ce([hidden], head.weight, None, labels, [1.0], 0.0, 2048)[0]

    def fused_backward():
        fused_out.pop("loss").backward()

    def old_forward():
        fused_out["loss"] = chunked_head_loss(hidden, labels, head, 0.0, 2048)[0]

    def old_projection():  # what the checkpointed backward recomputes (forward of the chunk, no graph)
        with torch.no_grad():
            chunked_head_loss(hidden, labels, head, 0.0, 2048)

    def optimizer_step(t):
        for p in t.model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        return lambda: t.bench_optimizer.step()

    pieces = {
        "body_fwd_bwd": body_pass, "trl_fused_lm_head_fwd_bwd": trl_head,
        "head_fused_ce_fwd": fused_forward, "head_fused_ce_bwd": fused_backward,
        "head_checkpoint_ce_fwd": old_forward, "head_checkpoint_ce_bwd": fused_backward,
        "head_checkpoint_recompute": old_projection,
        **{f"step_{v}": (lambda t=t: step(t)) for v, t in trainers.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for v in ("plain", "separate_fused"):
        times[f"optimizer_{v}"] = []
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, fn in pieces.items():
            times[name].append(_cpu_time(fn))
        for v in ("plain", "separate_fused"):
            times[f"optimizer_{v}"].append(_cpu_time(optimizer_step(trainers[v])))
            trainers[v].bench_optimizer.zero_grad(set_to_none=True)
    med = {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}
    report = {"shape": shape, **SHAPES[shape], "batch": batch, "seq": seq, "threads": threads, "repeats": repeats,
              "cpu_s": med}
    for v in ("separate_fused", "shared_fused", "separate_checkpoint", "shared_checkpoint"):
        report[f"{v}_step_ratio"] = round(med[f"step_{v}"] / med["step_plain"], 3)
    report["head_ce_peak_rss_added_mib"] = {
        w: round(float(subprocess.run([sys.executable, __file__, "--head-peak", w, "--shape", shape, "--batch", str(batch),
                                       "--seq", str(seq)], capture_output=True, text=True, check=True
                                      ).stdout.strip().splitlines()[-1]), 1) for w in ("fused", "checkpoint", "trl")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="decred")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    parser.add_argument("--variants", default="plain,final_only,separate,shared")
    parser.add_argument("--parts", action="store_true", help="time the parts of a step in one process instead")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--head-peak", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.head_peak:
        print(head_peak(a.head_peak, a.shape, a.batch, a.seq))
        return
    if a.parts:
        print(json.dumps(parts(a.shape, a.batch, a.seq, a.threads, a.repeats), indent=2))
        return
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
