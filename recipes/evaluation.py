"""Held-out evaluation: greedy and sampled accuracy of a model's final answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from rewards import answers_match, extract_answer
from trainers.signals import completion_signals, masked_mean, pack_prompt_completion

from .config import EvalConfig


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
             desc: str = "generate") -> tuple[list[str], list[list[int]]]:
    """Completions (``num_return_sequences`` per prompt, grouped by prompt): texts and token ids
    (cut after the first EOS, which is kept, as TRL does)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    texts = prompt_texts(tokenizer, prompts)
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    decoded: list[str] = []
    ids_out: list[list[int]] = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                 pad_token_id=tokenizer.pad_token_id, top_k=None, **sampling)
            new = ids[:, 1:] if encoder_decoder else ids[:, batch["input_ids"].shape[1] :]
            for row in new.tolist():  # rows that stop early are padded after their EOS
                ids_out.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
            decoded.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return decoded, ids_out


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Prompt strings; chat prompts go through the tokenizer's chat template."""
    return [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts]


@torch.no_grad()
def self_certainty(model, tokenizer, prompts: list, completion_ids: list[list[int]], temperature: float,
                   batch_size: int = 64) -> list[float]:
    """Mean per-token self-certainty ``KL(U || softmax(z/T))`` of each completion under ``model``
    (decoder-only), computed chunked like the RLIF trainer (no full-vocabulary tensor)."""
    texts = prompt_texts(tokenizer, prompts)
    head = model.get_output_embeddings()
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
        ids, mask, p = pack_prompt_completion(prompt_ids, completion_ids[i : i + batch_size], tokenizer.pad_token_id)
        c = ids.shape[1] - p
        hidden = model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
        sc = completion_signals(hidden, head.weight, ids.to(model.device), p, completion_length=c, bias=head.bias,
                                temperature=temperature, signals=("self_certainty",))["self_certainty"]
        out.extend(masked_mean(sc, mask[:, p:].to(sc.device)).tolist())
    return out


def mann_whitney_auc(positive: list[float], negative: list[float]) -> float:
    """P(a random ``positive`` value exceeds a random ``negative`` one), ties counting 1/2 (U / n1 n2)."""
    if not positive or not negative:
        return float("nan")
    pos, neg = torch.tensor(positive), torch.tensor(negative)
    greater = (pos[:, None] > neg[None, :]).float().sum() + 0.5 * (pos[:, None] == neg[None, :]).float().sum()
    return float(greater / (len(positive) * len(negative)))


def accuracy(completions: list[str], answers: list[str]) -> float:
    return sum(answers_match(extract_answer(c), a) for c, a in zip(completions, answers)) / max(len(completions), 1)


def evaluate_model(model, tokenizer, data: Dataset, cfg: EvalConfig, desc: str = "eval") -> dict:
    """Greedy and/or sampled accuracy on ``data``; with ``cfg.self_certainty`` also the mean
    self-certainty of correct vs incorrect sampled answers and its Mann-Whitney AUC."""
    if "answer" not in data.column_names:
        raise ValueError("evaluation needs an 'answer' column (map one in data.columns)")
    prompts, answers = data["prompt"], data["answer"]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    report: dict = {"rows": len(prompts)}
    if cfg.greedy:
        texts, _ = generate(model, tokenizer, prompts, do_sample=False, desc=f"{desc} greedy", **common)
        report["greedy_accuracy"] = accuracy(texts, answers)
    if cfg.sampled:
        torch.manual_seed(cfg.seed)
        texts, ids = generate(model, tokenizer, prompts, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                              num_return_sequences=cfg.num_samples, desc=f"{desc} sampled", **common)
        gold = [a for a in answers for _ in range(cfg.num_samples)]
        correct = [answers_match(extract_answer(t), a) for t, a in zip(texts, gold)]
        report["sampled_accuracy"] = sum(correct) / max(len(correct), 1)
        if cfg.self_certainty:
            repeated = [p for p in prompts for _ in range(cfg.num_samples)]
            sc = self_certainty(model, tokenizer, repeated, ids, cfg.temperature, cfg.batch_size)
            right = [s for s, ok in zip(sc, correct) if ok]
            wrong = [s for s, ok in zip(sc, correct) if not ok]
            report["sc_correct"] = sum(right) / len(right) if right else float("nan")
            report["sc_incorrect"] = sum(wrong) / len(wrong) if wrong else float("nan")
            report["sc_auc"] = mann_whitney_auc(right, wrong)
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
