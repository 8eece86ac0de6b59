"""Tiny offline code tasks, written by hand, so code rewards and code evaluation run anywhere.

``tiny://code``: LiveCodeBench-style rows. ``question`` asks for a program reading stdin; ``tests`` holds
the hidden stdin/stdout tests as JSON; ``completion`` is a reference solution in a ```` ```python ````
block. :data:`WRONG` holds, per problem, a plausible wrong program (tests check both).

``tiny://cruxeval``: CRUXEval-O-style rows. ``question`` shows a function ``f`` and an input and asks
for ``f``'s output; ``code``, ``input`` and ``output`` (the gold, a Python literal) are columns too;
``completion`` is the answer in CRUXEval's ``[ANSWER] ... [/ANSWER]`` form.

Every fourth problem is held out (split ``test``), the rest are ``train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from datasets import Dataset

SPLITS = ("train", "test")

# (statement, reference program, [(stdin, expected stdout), ...], wrong program)
PROBLEMS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("Read two integers a and b on one line; print a+b.", "a, b = map(int, input().split())\nprint(a + b)",
     [("1 2", "3"), ("-5 5", "0"), ("100 23", "123")], "a, b = map(int, input().split())\nprint(a - b)"),
    ("Read an integer n; print n squared.", "n = int(input())\nprint(n * n)",
     [("3", "9"), ("-4", "16"), ("0", "0")], "n = int(input())\nprint(2 * n)"),
    ("Read a line; print it reversed.", "print(input()[::-1])",
     [("abc", "cba"), ("racecar", "racecar"), ("ab cd", "dc ba")], "print(input())"),
    ("Read an integer n; print YES if it is even, else NO.", "print('YES' if int(input()) % 2 == 0 else 'NO')",
     [("4", "YES"), ("7", "NO"), ("0", "YES")], "print('YES' if int(input()) % 2 else 'NO')"),
    ("Read integers on one line; print their maximum.", "print(max(map(int, input().split())))",
     [("1 5 3", "5"), ("-1 -7", "-1"), ("9", "9")], "print(input().split()[-1])"),
    ("Read n, then n integers on the next line; print their sum.",
     "input()\nprint(sum(map(int, input().split())))",
     [("3\n1 2 3", "6"), ("1\n-4", "-4"), ("4\n10 20 30 40", "100")], "print(int(input()))"),
    ("Read a word; print the number of vowels (aeiou) in it.",
     "print(sum(c in 'aeiou' for c in input()))",
     [("hello", "2"), ("sky", "0"), ("aeiou", "5")], "print(len(input()))"),
    ("Read an integer n >= 0; print n factorial.", "import math\nprint(math.factorial(int(input())))",
     [("0", "1"), ("5", "120"), ("10", "3628800")], "n = int(input())\nprint(n * (n - 1))"),
    ("Read an integer n >= 1; print the numbers 1..n, one per line.",
     "for i in range(1, int(input()) + 1):\n    print(i)",
     [("3", "1\n2\n3"), ("1", "1"), ("5", "1\n2\n3\n4\n5")], "for i in range(int(input())):\n    print(i)"),
    ("Read two integers a and b; print their greatest common divisor.",
     "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))",
     [("12 18", "6"), ("7 13", "1"), ("100 75", "25")], "a, b = map(int, input().split())\nprint(min(a, b))"),
    ("Read a line; print it in upper case.", "print(input().upper())",
     [("abc", "ABC"), ("Hello World", "HELLO WORLD"), ("x1y", "X1Y")], "print(input().title())"),
    ("Read integers on one line; print them sorted ascending, space separated.",
     "print(*sorted(map(int, input().split())))",
     [("3 1 2", "1 2 3"), ("5", "5"), ("10 9 100", "9 10 100")], "print(*sorted(input().split()))"),
    ("Read an integer n; print the n-th Fibonacci number (F0=0, F1=1).",
     "a, b = 0, 1\nfor _ in range(int(input())):\n    a, b = b, a + b\nprint(a)",
     [("0", "0"), ("1", "1"), ("10", "55")], "n = int(input())\nprint(n)"),
    ("Read a word; print YES if it is a palindrome, else NO.",
     "s = input()\nprint('YES' if s == s[::-1] else 'NO')",
     [("level", "YES"), ("abc", "NO"), ("a", "YES")], "print('YES')"),
    ("Read integers on one line; print how many are positive.",
     "print(sum(int(x) > 0 for x in input().split()))",
     [("1 -2 3", "2"), ("-1 -1", "0"), ("0 5", "1")], "print(sum(int(x) >= 0 for x in input().split()))"),
    ("Read an integer n; print the sum of its decimal digits.",
     "print(sum(int(c) for c in input().strip().lstrip('-')))",
     [("123", "6"), ("9", "9"), ("1000", "1")], "print(len(input()))"),
    ("Read a line of words; print the number of words.", "print(len(input().split()))",
     [("a b c", "3"), ("hello", "1"), ("one  two", "2")], "print(input().count(' ') + 1)"),
    ("Read an integer n >= 2; print YES if n is prime, else NO.",
     "n = int(input())\nprint('YES' if all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')",
     [("2", "YES"), ("9", "NO"), ("97", "YES")], "n = int(input())\nprint('YES' if n % 2 else 'NO')"),
    ("Read two integers a and b; print a to the power b.", "a, b = map(int, input().split())\nprint(a ** b)",
     [("2 10", "1024"), ("3 0", "1"), ("-2 3", "-8")], "a, b = map(int, input().split())\nprint(a * b)"),
    ("Read a line; print the count of each distinct character in order of first appearance as c:k.",
     "s = input()\nseen = {}\nfor c in s:\n    seen[c] = seen.get(c, 0) + 1\n"
     "print(' '.join(f'{c}:{k}' for c, k in seen.items()))",
     [("aab", "a:2 b:1"), ("xyz", "x:1 y:1 z:1"), ("zzz", "z:3")],
     "s = input()\nprint(' '.join(f'{c}:1' for c in dict.fromkeys(s)))"),
    ("Read integers on one line; print the second largest distinct value.",
     "print(sorted(set(map(int, input().split())))[-2])",
     [("1 2 3", "2"), ("5 5 4", "4"), ("-1 -2", "-2")], "print(sorted(map(int, input().split()))[-2])"),
    ("Read an integer n; print a right triangle of n rows of '*' (row i has i stars).",
     "for i in range(1, int(input()) + 1):\n    print('*' * i)",
     [("1", "*"), ("3", "*\n**\n***"), ("2", "*\n**")], "for i in range(int(input())):\n    print('*' * i)"),
    ("Read a binary string; print its value in decimal.", "print(int(input(), 2))",
     [("101", "5"), ("0", "0"), ("1111", "15")], "print(int(input()))"),
    ("Read an integer n >= 0; print it in binary without leading zeros.", "print(bin(int(input()))[2:])",
     [("5", "101"), ("0", "0"), ("8", "1000")], "print(bin(int(input())))"),
]

# (function source, input literal, output literal): f's output on the input, worked out by hand
OUTPUT_PREDICTION: list[tuple[str, str, str]] = [
    ("def f(x):\n    return x * 2 + 1", "3", "7"),
    ("def f(s):\n    return s[::-1]", "'abc'", "'cba'"),
    ("def f(xs):\n    return sorted(xs, reverse=True)", "[3, 1, 2]", "[3, 2, 1]"),
    ("def f(s):\n    return s.upper() + '!'", "'hi'", "'HI!'"),
    ("def f(n):\n    return sum(range(n))", "5", "10"),
    ("def f(xs):\n    return [x for x in xs if x % 2 == 0]", "[1, 2, 3, 4]", "[2, 4]"),
    ("def f(d):\n    return sorted(d.items())", "{'b': 2, 'a': 1}", "[('a', 1), ('b', 2)]"),
    ("def f(s):\n    return s.count('a')", "'banana'", "3"),
    ("def f(a, b):\n    return a // b, a % b", "17, 5", "(3, 2)"),
    ("def f(xs):\n    return len(set(xs))", "[1, 1, 2, 3, 3]", "3"),
    ("def f(s):\n    return s.split('-')", "'a-b-c'", "['a', 'b', 'c']"),
    ("def f(n):\n    return n % 3 == 0", "9", "True"),
    ("def f(xs):\n    return xs[1:] + xs[:1]", "[1, 2, 3]", "[2, 3, 1]"),
    ("def f(s):\n    return s.replace('a', 'o')", "'banana'", "'bonono'"),
    ("def f(x):\n    return {x, x + 1}", "1", "{1, 2}"),
    ("def f(n):\n    return [i * i for i in range(n)]", "4", "[0, 1, 4, 9]"),
]

CODE_PROMPT = "{statement}\nWrite a Python program that reads stdin and writes stdout. Answer with one ```python block."
CRUX_PROMPT = ("You are given a Python function and an input. Predict the output of f on it.\n"
               "```python\n{code}\n```\nInput: f({input})\n"
               "Answer as [ANSWER]assert f({input}) == <output>[/ANSWER].")


def _split_of(index: int) -> str:
    return "test" if index % 4 == 3 else "train"


@dataclass(frozen=True)
class CodeSpec:
    """``tiny://code``: stdin/stdout programming problems (no options)."""

    def dataset(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"code split must be one of {SPLITS}, got {split!r}")
        rows = [{"question": CODE_PROMPT.format(statement=statement),
                 "tests": json.dumps([{"input": i + "\n", "output": o + "\n"} for i, o in tests]),
                 "completion": f"```python\n{program}\n```"}
                for k, (statement, program, tests, _) in enumerate(PROBLEMS) if _split_of(k) == split]
        return Dataset.from_list(rows)


@dataclass(frozen=True)
class OutputPredictionSpec:
    """``tiny://cruxeval``: predict a function's output on an input (no options)."""

    def dataset(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"cruxeval split must be one of {SPLITS}, got {split!r}")
        rows = [{"question": CRUX_PROMPT.format(code=code, input=arg), "code": code, "input": arg, "output": out,
                 "completion": f"[ANSWER]assert f({arg}) == {out}[/ANSWER]"}
                for k, (code, arg, out) in enumerate(OUTPUT_PREDICTION) if _split_of(k) == split]
        return Dataset.from_list(rows)


WRONG = {statement: wrong for statement, _, _, wrong in PROBLEMS}
