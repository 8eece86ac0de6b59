"""Procedurally generated tasks with checkable answers, deterministic by seed.

``arithmetic``: ``a <op> b`` with operands of up to ``digits`` digits. Each problem belongs to
exactly one split, decided by a hash of the problem itself, so the held-out split never leaks
into training whatever the sizes and seeds. Columns: ``question`` (``"12+34="``), ``answer``
(``"46"``) and ``completion`` (the answer as the model should write it).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

from datasets import Dataset

OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ArithmeticSpec:
    """Options of the arithmetic task; each is a ``tiny://arithmetic?key=value`` query option."""

    ops: str = field(default="add", metadata={"help": "comma-separated subset of add,sub,mul"})
    digits: int = field(default=2, metadata={"help": "maximum digits per operand"})
    n_train: int = field(default=20000, metadata={"help": "training rows (sampled with replacement)"})
    n_test: int = field(default=500, metadata={"help": "held-out rows (distinct problems)"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of the problem space held out"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def __post_init__(self):
        unknown = set(self.op_list) - set(OPS)
        if unknown or not self.op_list:
            raise ValueError(f"arithmetic ops must be a comma-separated subset of {sorted(OPS)}, got {self.ops!r}")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"arithmetic digits must be in 1..9, got {self.digits}")
        if not 0 < self.test_fraction < 1:
            raise ValueError("arithmetic test_fraction must be in (0, 1)")

    @property
    def op_list(self) -> list[str]:
        return [op.strip() for op in self.ops.split(",") if op.strip()]

    def as_dict(self) -> dict:
        return asdict(self)


def problem_split(a: int, op: str, b: int, test_fraction: float) -> str:
    """The split a problem belongs to, fixed by the problem alone."""
    h = int.from_bytes(hashlib.sha256(f"{a}{op}{b}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


SMALL_SPACE = 200_000
"""Problem spaces up to this size are enumerated to count their held-out problems exactly."""


def held_out_problems(spec: ArithmeticSpec) -> int:
    """How many distinct problems of ``spec``'s (small) space fall in the held-out split.

    >>> held_out_problems(ArithmeticSpec(digits=1)), held_out_problems(ArithmeticSpec(digits=1, ops="sub"))
    (8, 4)
    """
    top, problems = 10**spec.digits - 1, set()
    for op in spec.op_list:
        symbol = OPS[op][0]
        for a in range(top + 1):
            for b in range(top + 1):
                x, y = (b, a) if op == "sub" and b > a else (a, b)
                if problem_split(x, symbol, y, spec.test_fraction) == "test":
                    problems.add((x, symbol, y))
    return len(problems)


def arithmetic_rows(spec: ArithmeticSpec, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"arithmetic split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{spec.seed}-{split}")
    top = 10**spec.digits - 1
    n = spec.n_train if split == "train" else spec.n_test
    space = len(spec.op_list) * (top + 1) ** 2
    if split == "test":  # distinct problems; the held-out space may be smaller than n_test
        n = min(n, held_out_problems(spec) if space <= SMALL_SPACE else int(space * spec.test_fraction * 0.9))
        if n == 0:
            raise ValueError(f"tiny://arithmetic with digits={spec.digits}, ops={spec.ops!r} and test_fraction="
                             f"{spec.test_fraction} holds out no problem: raise digits or test_fraction")
    rows, seen = [], set()
    while len(rows) < n:
        op = rng.choice(spec.op_list)
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "sub" and b > a:
            a, b = b, a
        symbol, fn = OPS[op]
        if problem_split(a, symbol, b, spec.test_fraction) != split:
            continue
        if split == "test":
            if (a, symbol, b) in seen:
                continue
            seen.add((a, symbol, b))
        answer = str(fn(a, b))
        rows.append({"question": f"{a}{symbol}{b}=", "answer": answer, "completion": answer})
    return rows


def arithmetic_dataset(spec: ArithmeticSpec, split: str) -> Dataset:
    """The ``split`` (``train`` or ``test``) of the arithmetic task as a ``datasets.Dataset``."""
    return Dataset.from_list(arithmetic_rows(spec, split))
