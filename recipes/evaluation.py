"""Held-out evaluation: greedy and sampled accuracy of a model's final answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from rewards import answers_match, extract_answer

from .config import EvalConfig


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, desc: str = "generate") -> list[str]:
    """Completions (``num_return_sequences`` per prompt, grouped by prompt) as decoded text."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    out: list[str] = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                 pad_token_id=tokenizer.pad_token_id, top_k=None, **sampling)
            new = ids if encoder_decoder else ids[:, batch["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out


def accuracy(completions: list[str], answers: list[str]) -> float:
    return sum(answers_match(extract_answer(c), a) for c, a in zip(completions, answers)) / max(len(completions), 1)


def evaluate_model(model, tokenizer, data: Dataset, cfg: EvalConfig, desc: str = "eval") -> dict:
    """``greedy_accuracy`` and/or ``sampled_accuracy`` (at ``cfg.temperature``) on ``data``."""
    if "answer" not in data.column_names:
        raise ValueError("evaluation needs an 'answer' column (map one in data.columns)")
    prompts, answers = data["prompt"], data["answer"]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    report: dict = {"rows": len(prompts)}
    if cfg.greedy:
        report["greedy_accuracy"] = accuracy(generate(model, tokenizer, prompts, do_sample=False, desc=f"{desc} greedy", **common), answers)
    if cfg.sampled:
        torch.manual_seed(cfg.seed)
        texts = generate(model, tokenizer, prompts, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                         num_return_sequences=cfg.num_samples, desc=f"{desc} sampled", **common)
        report["sampled_accuracy"] = accuracy(texts, [a for a in answers for _ in range(cfg.num_samples)])
    return report


def format_table(reports: dict[str, dict]) -> str:
    """A plain-text table: one row per model, one column per metric."""
    metrics = sorted({k for r in reports.values() for k in r if k != "rows"})
    width = max(len(name) for name in reports) + 2
    lines = ["model".ljust(width) + "".join(m.rjust(20) for m in metrics)]
    for name, report in reports.items():
        cells = "".join((f"{report[m]:.3f}" if m in report else "-").rjust(20) for m in metrics)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def write_report(reports: dict[str, dict], directory: str | Path) -> Path:
    path = Path(directory) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reports, indent=2))
    return path
