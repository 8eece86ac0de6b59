"""Convert code benchmarks to the evaluator's columns (``question``, ``tests``); run as a script.

    python -m recipes.code_data livecodebench code_generation_lite/test6.jsonl data/livecodebench/test.jsonl

LiveCodeBench (``livecodebench/code_generation_lite`` on the Hub: a loading script, which
``datasets`` no longer runs, over jsonl files ``test.jsonl`` ... ``test6.jsonl``; clone the dataset
repository and convert the files you want) keeps its hidden tests compressed
(``private_test_cases``: base64 of zlib of a pickled JSON string) and has two kinds of test: stdin
ones (AtCoder, Codeforces) and call-based ones (LeetCode: ``Solution().<func_name>(*args)``, the
arguments one JSON value per line). A row becomes ``question`` (LiveCodeBench's generic prompt:
the problem, then the starter code or the stdin/stdout instruction) and ``tests`` (JSON: stdin tests
as ``{input, output}``, call-based ones as assert-style checks), keeping its id, platform,
difficulty and date. The pickle is read by an unpickler that builds no objects but strings.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import pickle
import zlib
from pathlib import Path

# LiveCodeBench's generic code-generation prompt (lcb_runner/prompts/code_generation.py)
LCB_SYSTEM = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
              "generate a correct Python program that matches the specification and passes all tests. You will NOT "
              "return anything except for the program.")
_WITH_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your code "
                 "within delimiters.")
_WITHOUT_STARTER = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
                    "on the sample inputs). Enclose your code within delimiters as follows.")


class _StringsOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test file")


def decode_tests(cell: str) -> list[dict]:
    """LiveCodeBench's test list: plain JSON, or base64(zlib(pickle(JSON string)))."""
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        raw = zlib.decompress(base64.b64decode(cell.encode()))
        return json.loads(_StringsOnly(io.BytesIO(raw)).load())


def lcb_question(content: str, starter_code: str = "") -> str:
    """LiveCodeBench's generic prompt for one problem."""
    if starter_code:
        fmt = f"### Format: {_WITH_STARTER}\n```python\n{starter_code}\n```\n\n"
    else:
        fmt = f"### Format: {_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return f"### Question:\n{content}\n\n{fmt}### Answer: (use the provided format with backticks)\n\n"


def call_check(func_name: str, arguments: str, output: str) -> str:
    """An assert-style check for a call-based test: ``Solution().func(*args) == expected``, the
    arguments one JSON value per line, the expected value JSON."""
    return ("import json as _json\n"
            f"_args = [_json.loads(_line) for _line in {arguments!r}.split('\\n') if _line.strip()]\n"
            f"_expected = _json.loads({output!r})\n"
            f"_got = Solution().{func_name}(*_args)\n"
            "assert _got == _expected or (isinstance(_got, tuple) and list(_got) == _expected)\n")


def livecodebench_row(raw: dict) -> dict:
    """One ``code_generation_lite`` row in our columns."""
    tests = decode_tests(raw["public_test_cases"]) + decode_tests(raw.get("private_test_cases") or "[]")
    func_name = json.loads(raw.get("metadata") or "{}").get("func_name")
    converted = []
    for test in tests:
        if test.get("testtype", "stdin") == "stdin":
            converted.append({"input": test["input"], "output": test["output"]})
        elif func_name:
            converted.append({"check": call_check(func_name, test["input"], test["output"])})
        else:
            raise ValueError(f"{raw.get('question_id')}: a call-based test without metadata.func_name")
    return {"question": lcb_question(raw["question_content"], raw.get("starter_code") or ""),
            "tests": json.dumps(converted), "question_id": raw.get("question_id"), "platform": raw.get("platform"),
            "difficulty": raw.get("difficulty"), "contest_date": raw.get("contest_date")}


def convert(kind: str, source: str, target: str) -> int:
    if kind != "livecodebench":
        raise SystemExit(f"error: unknown benchmark {kind!r} (livecodebench)")
    rows = [livecodebench_row(json.loads(line)) for line in Path(source).read_text().splitlines() if line.strip()]
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m recipes.code_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", help="benchmark: livecodebench")
    parser.add_argument("source", help="the benchmark's jsonl file")
    parser.add_argument("target", help="jsonl file to write, in the evaluator's columns")
    args = parser.parse_args()
    print(f"{convert(args.kind, args.source, args.target)} rows -> {args.target}")
