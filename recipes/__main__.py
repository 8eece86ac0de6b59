"""``python -m recipes list``: every recipe and every config, with one-line descriptions."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from omegaconf import OmegaConf

PROGRAMS = Path(__file__).resolve().parent
CONFIGS = PROGRAMS.parent / "configs"


def recipe_names() -> list[str]:
    """Every program: each ``recipes/<name>.py`` (the library is the ``recipes.common`` package)."""
    return sorted(p.stem for p in PROGRAMS.glob("*.py") if not p.stem.startswith("_"))


def config_files(root: Path = CONFIGS) -> dict[str, list[Path]]:
    """Recipe name -> its YAML files (``configs/<recipe>/**/*.yaml``; ``configs/base`` excluded)."""
    return {d.name: sorted(d.rglob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir() and d.name != "base"}


def list_all(out=sys.stdout) -> None:
    configs = config_files() if CONFIGS.is_dir() else {}
    for name in recipe_names():
        doc = (importlib.import_module(f"recipes.{name}").__doc__ or "").strip().splitlines()
        print(f"{name:<14} {doc[0] if doc else ''}", file=out)
        for path in configs.get(name, []):
            description = OmegaConf.load(path).get("description", "")
            print(f"  {path.relative_to(CONFIGS.parent)!s:<56} {description}", file=out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m recipes")
    parser.add_argument("command", choices=["list"], help="list: every recipe and config")
    parser.parse_args()
    list_all()
