"""Layout rules a newcomer relies on: a module over ``LIMIT`` lines says in its docstring why it is
one module (a paragraph starting ``Size:``), so long files are a decision, not an accident."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 400


def unexplained_long_modules(root: Path, packages=("rewards", "trainers", "recipes", "benchmarks")) -> list[str]:
    """Modules over ``LIMIT`` lines whose docstring has no ``Size:`` paragraph, as ``path (lines)``."""
    out = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            lines = text.count("\n") + 1
            doc = ast.get_docstring(ast.parse(text)) or ""
            if lines > LIMIT and not any(p.startswith("Size:") for p in doc.split("\n\n")):
                out.append(f"{path.relative_to(root)} ({lines})")
    return out


def test_long_modules_say_why():
    assert unexplained_long_modules(ROOT) == []


def test_an_unexplained_long_module_is_found(tmp_path):
    (tmp_path / "rewards").mkdir()
    body = "\n".join(f"x{i} = {i}" for i in range(LIMIT + 1))
    (tmp_path / "rewards" / "long.py").write_text(f'"""A long module."""\n{body}\n')
    (tmp_path / "rewards" / "why.py").write_text(f'"""A long module.\n\nSize: one table, read whole."""\n{body}\n')
    (tmp_path / "rewards" / "short.py").write_text('"""Short."""\nx = 1\n')
    assert unexplained_long_modules(tmp_path, ("rewards",)) == [f"rewards/long.py ({LIMIT + 3})"]
