"""Command-line entry shared by every recipe: ``--config FILE [--print-config] [key=value ...]``.

``--help`` shows the recipe's own description (its module docstring's first paragraph), every key
of its config sections with help and default (from :mod:`recipes.common.schema`), and the
recipe's own flags (:class:`Command`). ``--print-config`` prints the resolved config as YAML
(base files merged, ``${...}`` resolved, overrides applied, checked) and exits before any model
loads. A config problem prints one line and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import config_yaml, load_config, load_raw
from .dry_run import dry_run_overrides
from .errors import ConfigError
from .schema import RecipeConfig, schema_help


@dataclass(frozen=True)
class Command:
    """A recipe's own flag that does something else than run a config (``--compare RUN [RUN ...]``):
    ``run`` gets the flag's values; no ``--config`` is needed."""

    flag: str
    metavar: str
    help: str
    run: Callable[[list[str]], object]

    @property
    def dest(self) -> str:
        """The flag's attribute in the parsed arguments (``--compare`` -> ``compare``)."""
        return self.flag.lstrip("-").replace("-", "_")


def description(prog: str, schema: type[RecipeConfig]) -> str:
    """The first paragraph of the recipe module's docstring (a recipe outside ``recipes/``: its schema's)."""
    module = sys.modules.get("__main__")
    if getattr(getattr(module, "__spec__", None), "name", None) != f"recipes.{prog}":
        try:
            module = importlib.import_module(f"recipes.{prog}")
        except ModuleNotFoundError:
            module = schema
    return (module.__doc__ or "").strip().split("\n\n")[0]


def parse_args(prog: str, schema: type[RecipeConfig], argv: list[str] | None = None,
               commands: tuple[Command, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{prog}", description=description(prog, schema),
                                     epilog=schema_help(schema), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", required=not commands, help="recipe YAML file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for config errors")
    parser.add_argument("--dry-run", action="store_true",
                        help="2 steps on a tiny model of the same family and a few generated rows (CPU, seconds)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML: bases merged, ${...} resolved, overrides applied) "
                             "and exit before any model loads")
    for command in commands:
        parser.add_argument(command.flag, metavar=command.metavar, nargs="+", help=command.help)
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.learning_rate=1e-6")
    args = parser.parse_args(argv)
    given = [c for c in commands if getattr(args, c.dest) is not None]
    args.command = given[0] if given else None
    if args.command is None and args.config is None:
        parser.error("the following arguments are required: --config")
    return args


def _finish_distributed() -> None:
    """Ranks wait for the main process (which evaluates last), then close the process group, so
    no rank exits while a collective is still open (gloo aborts such a process on shutdown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(prog: str, schema: type[RecipeConfig], run: Callable[[RecipeConfig], object], argv: list[str] | None = None,
         commands: tuple[Command, ...] = ()):
    """Load and validate the config, then ``run`` it (or print it, or run a recipe's own command);
    config errors exit with code 2."""
    args = parse_args(prog, schema, argv, commands)
    if args.command is not None:
        return args.command.run(getattr(args, args.command.dest))
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        overrides = list(args.overrides)
        if args.dry_run:
            workdir = tempfile.mkdtemp(prefix=f"intrinsic-dry-run-{prog}-")
            overrides += dry_run_overrides(schema, args.config, overrides, Path(workdir))
            print(f"dry run of {args.config} in {workdir}", file=sys.stderr if args.print_config else sys.stdout,
                  flush=True)
        cfg = load_config(schema, args.config, overrides)
        if args.print_config:  # the trainer section as resolved, not TRL's derived values (they would clash)
            print(config_yaml(cfg, trainer=load_raw(args.config, overrides)[0].get("trainer") or {}), end="", flush=True)
            return None
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
