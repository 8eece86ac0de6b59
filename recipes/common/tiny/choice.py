"""``tiny://gpqa``: hand-written four-option questions in GPQA's layout, so the multiple-choice path
(options shuffled per row, letter grading) runs offline.

Columns as in the Hub dataset ``Idavidrein/gpqa``: ``Question``, ``Correct Answer``, ``Incorrect
Answer 1`` .. ``Incorrect Answer 3`` (the correct option in its own column, as GPQA lists it). Every
fourth question is held out (split ``test``), the rest are ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

SPLITS = ("train", "test")

# (question, correct, three wrong options)
QUESTIONS: list[tuple[str, str, tuple[str, str, str]]] = [
    ("What is 7 times 8?", "56", ("54", "64", "48")),
    ("Which gas do plants take in for photosynthesis?", "carbon dioxide", ("oxygen", "nitrogen", "helium")),
    ("What is the chemical symbol of sodium?", "Na", ("So", "S", "Sd")),
    ("How many sides does a hexagon have?", "6", ("5", "7", "8")),
    ("What is the derivative of x^2?", "2x", ("x", "x^3/3", "2")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Earth", "Mars")),
    ("What is the boiling point of water at sea level in Celsius?", "100", ("90", "110", "212")),
    ("What is the square root of 81?", "9", ("8", "7", "81/2")),
    ("Which particle carries a negative charge?", "electron", ("proton", "neutron", "photon")),
    ("What is 15 minus 9?", "6", ("4", "5", "24")),
    ("Which base pairs with adenine in DNA?", "thymine", ("cytosine", "guanine", "uracil")),
    ("What is the SI unit of force?", "newton", ("joule", "watt", "pascal")),
    ("What is 2 to the power 5?", "32", ("10", "16", "25")),
    ("Which organ pumps blood through the body?", "heart", ("lung", "liver", "kidney")),
    ("What is the pH of pure water at 25 C?", "7", ("0", "1", "14")),
    ("How many degrees are in a right angle?", "90", ("45", "180", "360")),
]


@dataclass(frozen=True)
class ChoiceSpec:
    """``tiny://gpqa``: four-option questions, correct option first (no options)."""

    def dataset(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"gpqa split must be one of {SPLITS}, got {split!r}")
        rows = [{"Question": q, "Correct Answer": right, "Incorrect Answer 1": wrong[0],
                 "Incorrect Answer 2": wrong[1], "Incorrect Answer 3": wrong[2]}
                for k, (q, right, wrong) in enumerate(QUESTIONS) if ("test" if k % 4 == 3 else "train") == split]
        return Dataset.from_list(rows)
