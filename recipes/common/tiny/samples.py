"""Offline data of a tiny model's own noisy answers: ``tiny://samples?model=qwen2-arith&temperature=1.2``.

A-LoL trains on a fixed dataset of (prompt, response) pairs of mixed quality. In the tiny world
that dataset is the warm-started model answering arithmetic problems at a sampling temperature:
some answers are right, some wrong, and ``math_accuracy`` tells which. Splits:

* ``train``: ``n_train`` problems of the arithmetic train split, each with one sampled answer
  (``completion``) and the gold ``answer``;
* ``validation``: ``n_valid`` other train-split problems (``question``, ``answer``), for the value head;
* ``test``: the arithmetic task's held-out problems (never seen in training).

``model`` is a tiny model URI without the scheme, its options separated by ``;``
(``qwen2-arith;layers=2;hidden=64``). Built once and cached (``$INTRINSIC_CACHE/tiny``) by a hash
of every option.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from .tasks import ArithmeticSpec, arithmetic_rows


@dataclass(frozen=True)
class SamplesSpec:
    """Options of ``tiny://samples``; each is a query option."""

    model: str = field(default="qwen2-arith", metadata={"help": "tiny model (URI without tiny://, options after ';')"})
    temperature: float = field(default=1.2, metadata={"help": "sampling temperature of the answers"})
    n_train: int = field(default=2000, metadata={"help": "training pairs"})
    n_valid: int = field(default=200, metadata={"help": "value-head prompts"})
    n_test: int = field(default=500, metadata={"help": "held-out problems"})
    max_new_tokens: int = field(default=8, metadata={"help": "answer length budget"})
    ops: str = field(default="add", metadata={"help": "arithmetic ops"})
    digits: int = field(default=2, metadata={"help": "arithmetic digits"})
    seed: int = field(default=0, metadata={"help": "problem and sampling seed"})

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError("samples: temperature must be > 0")
        if min(self.n_train, self.n_valid) < 1:
            raise ValueError("samples: n_train and n_valid must be >= 1")
        ArithmeticSpec(ops=self.ops, digits=self.digits)  # validates ops/digits

    @property
    def model_uri(self) -> str:
        name, _, options = self.model.partition(";")
        return f"tiny://{name}" + (f"?{options.replace(';', '&')}" if options else "")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _problems(spec: SamplesSpec, split: str) -> list[dict]:
    if split == "test":
        return arithmetic_rows(ArithmeticSpec(ops=spec.ops, digits=spec.digits, n_test=spec.n_test, seed=spec.seed), "test")
    n = spec.n_train if split == "train" else spec.n_valid
    seed = spec.seed if split == "train" else spec.seed + 7919
    return arithmetic_rows(ArithmeticSpec(ops=spec.ops, digits=spec.digits, n_train=n, seed=seed), "train")


def build_samples(spec: SamplesSpec, model_dir: str, directory: Path) -> None:
    """Write ``train/validation/test.jsonl`` under ``directory`` (the model's sampled answers in train)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..generation import generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = _problems(spec, "train")
    torch.manual_seed(spec.seed)
    texts, _ = generate(model, tokenizer, [r["question"] for r in rows], max_new_tokens=spec.max_new_tokens,
                        batch_size=256, do_sample=True, temperature=spec.temperature, desc="tiny samples")
    train = [{"question": r["question"], "answer": r["answer"], "completion": t} for r, t in zip(rows, texts)]
    for split, data in (("train", train), ("validation", _problems(spec, "validation")), ("test", _problems(spec, "test"))):
        keep = [{k: r[k] for k in ("question", "answer", "completion") if k in r} for r in data]
        (directory / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in keep) + "\n")
    (directory / "spec.json").write_text(json.dumps({"samples": spec.as_dict(), "model_dir": model_dir}, indent=2))


def load_samples(directory: Path, split: str) -> Dataset:
    path = Path(directory) / f"{split}.jsonl"
    if not path.exists():
        raise ValueError(f"samples split must be one of train, validation, test; got {split!r}")
    return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
