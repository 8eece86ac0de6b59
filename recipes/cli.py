"""Command-line entry shared by every recipe: ``--config FILE [key=value ...]``.

A config problem prints one line and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .config import ConfigError, RecipeConfig, load_config


def parse_args(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{prog}", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe YAML file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for config errors")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.learning_rate=1e-6")
    return parser.parse_args(argv)


def main(prog: str, schema: type[RecipeConfig], run: Callable[[RecipeConfig], object], argv: list[str] | None = None):
    """Load and validate the config, then ``run`` it; config errors exit with code 2."""
    args = parse_args(prog, argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(schema, args.config, args.overrides)
        return run(cfg)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
