"""Multiple-choice answers (GPQA): which option letter a completion chose.

The papers' GPQA prompts ask for the letter in a fixed form: RENT's for ``\\boxed{LETTER}`` on the
last line, the simple-evals prompt (TTRL's ``recipe/r1``) for a last line ``Answer: LETTER``. A
completion's choice is the letter of the last of these, by position in the text:

* a closed ``\\boxed{...}`` (or ``\\fbox{...}``) whose content, with ``\\text{}``-style wrappers and
  ``$`` removed, is one letter, optionally in parentheses and followed by ``)``, ``.`` or ``:`` and
  the option's text (``\\boxed{C}``, ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``, ``\\boxed{C) 42}``;
  lower case is read as upper case);
* ``answer`` (any case), optionally ``is`` / ``option``, an optional ``:``, optional ``*`` / ``$``,
  then a capital letter not followed by a letter or digit, or any letter in parentheses
  (``The answer is (C)``, ``Answer: C``, ``**Answer:** C``, ``the correct answer is option (c)``);
* a last non-empty line that is just a capital letter, optionally in parentheses or with a
  period (``C``, ``(C)``, ``**C.**``).

A letter outside the options (``\\boxed{E}`` with four options), or no such form at all, is no
choice (``None``): never a guess. TTRL's own extractor instead takes the last stand-alone capital
A-D anywhere in the upper-cased completion, which reads the article "a" as option A.
"""

from __future__ import annotations

import re
import string

from .answers import closing_brace

LETTERS = "ABCD"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_BOXED_LETTER = re.compile(r"^[(\[]?([A-Za-z])(?:[)\].:](?:\s.*)?)?$", re.DOTALL)
_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?(?:(?i:option)\s*)?[:：]?[\s*$]*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z0-9]))")
_LINE = re.compile(r"^[(\[]?([A-Z])[)\]]?\.?$")


def option_letters(n: int) -> str:
    """The letters of ``n`` options.

    >>> option_letters(4)
    'ABCD'
    """
    if not 2 <= n <= 26:
        raise ValueError(f"a multiple-choice row needs 2..26 options, got {n}")
    return string.ascii_uppercase[:n]


def _box_letter(content: str) -> str | None:
    text = content.replace("$", "").strip()
    while True:
        unwrapped = _WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped.strip()
    match = _BOXED_LETTER.match(text)
    return match.group(1).upper() if match else None


def _candidates(text: str) -> list[tuple[int, str]]:
    found = []
    for box in _BOX.finditer(text):
        end = closing_brace(text, box.end() - 1)
        if end is not None:
            letter = _box_letter(text[box.end() : end])
            if letter:
                found.append((box.start(), letter))
    for match in _PHRASE.finditer(text):
        found.append((match.start(), (match.group(1) or match.group(2)).upper()))
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        last = lines[-1].strip().strip("*$ ").strip()
        match = _LINE.match(last)
        if match:
            found.append((text.rfind(lines[-1]), match.group(1)))
    return found


def extract_choice(text: str, letters: str = LETTERS) -> str | None:
    """The option letter ``text`` chose (the last stated form, see the module docstring), ``None`` if
    it states none or one outside ``letters``.

    >>> extract_choice("... so the answer is (C)."), extract_choice("Answer: B"), extract_choice("$\\\\boxed{D}$")
    ('C', 'B', 'D')
    >>> extract_choice("Answer: A at first, but on reflection \\\\boxed{C}"), extract_choice("A good start."), \\
    ...     extract_choice("\\\\boxed{E}")
    ('C', None, None)
    """
    found = _candidates(text or "")
    if not found:
        return None
    letter = max(found, key=lambda c: c[0])[1]
    return letter if letter in letters else None


def choice_correct(text: str, gold: str, letters: str = LETTERS) -> bool:
    """Whether ``text`` chose the gold letter.

    >>> choice_correct("The answer is (C)", "C"), choice_correct("The answer is (C)", "A")
    (True, False)
    """
    return extract_choice(text, letters) == str(gold).strip().upper()
