"""Command-line entry shared by every recipe: ``--config FILE [key=value ...]``.

A config problem prints one line and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import load_config
from .dry_run import dry_run_overrides
from .errors import ConfigError
from .schema import RecipeConfig


def parse_args(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{prog}", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe YAML file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for config errors")
    parser.add_argument("--dry-run", action="store_true",
                        help="2 steps on a tiny model of the same family and a few generated rows (CPU, seconds)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.learning_rate=1e-6")
    return parser.parse_args(argv)


def _finish_distributed() -> None:
    """Ranks wait for the main process (which evaluates last), then close the process group, so
    no rank exits while a collective is still open (gloo aborts such a process on shutdown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(prog: str, schema: type[RecipeConfig], run: Callable[[RecipeConfig], object], argv: list[str] | None = None):
    """Load and validate the config, then ``run`` it; config errors exit with code 2."""
    args = parse_args(prog, argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        overrides = list(args.overrides)
        if args.dry_run:
            workdir = tempfile.mkdtemp(prefix=f"intrinsic-dry-run-{prog}-")
            overrides += dry_run_overrides(schema, args.config, overrides, Path(workdir))
            print(f"dry run of {args.config} in {workdir}", flush=True)
        cfg = load_config(schema, args.config, overrides)
        result = run(cfg)
        _finish_distributed()
        return result
    except ConfigError as err:
        if args.debug:
            raise
        if err.source == "config":  # raised where the file's name is not known (data and model loading)
            err = ConfigError(args.config, err.key, err.problem, err.suggestion)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
