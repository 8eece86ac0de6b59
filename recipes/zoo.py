"""The label-free zoo: GRPO with gold next to every label-free method, same base, budget and seeds.

    python -m recipes.zoo --config configs/zoo/tiny.yaml [--methods gold,ttrl] [--seeds 0,1] [--compact] [--cached]

A method is a recipe, its config and overrides (``zoo.methods``); the zoo's ``zoo.budget`` overrides
(steps, group size, learning rate) go to every method that takes them, its ``model`` and
``data.path`` to all. Each (method, seed) cell trains in this process, is evaluated on the held-out
split with the zoo's ``eval`` section (greedy, sampled and vote accuracy, each signal's AUROC) and
cached as JSON keyed by (method, seed, config digest): a re-run computes only the missing cells. A
method whose config file does not exist (yet) is skipped with a logged line. Writes ``zoo.md``,
``zoo.json`` (mean ± sample std over seeds) and ``plots/`` under ``output_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .common.config import check_section, config_yaml, load_config, load_raw, save_config
from .common.errors import COMMAND_LINE, ConfigError
from .common.schema import RecipeConfig, field_default, schema_help
from .common.zoo_table import SPREAD, aggregate, cell_path, digest, format_markdown, mean_history, read_cell, write_cell

logger = logging.getLogger("intrinsic")


@dataclass
class ZooMethod:
    """One method of the zoo: a recipe run with a config and overrides."""

    name: str = field(metadata={"help": "short id: the cache directory and the --methods name"})
    config: str = field(metadata={"help": "the method's YAML (relative to the working directory); a file that does "
                                          "not exist is skipped with a logged line"})
    recipe: str = field(default="rlif", metadata={"help": "recipe that trains it (rlif, intuitor, self_improve, ...)"})
    label: str = field(default="", metadata={"help": "row label in the table ('': the name)"})
    budget: bool = field(default=True, metadata={"help": "apply zoo.budget (the shared GRPO budget) to this method"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "dotlist overrides, after zoo.budget"})
    trained: str = field(default="", metadata={"help": "the trained model inside the run's trainer.output_dir "
                                                       "('': output_dir itself; self-improvement: round_<k>/model)"})


@dataclass
class ZooSection:
    """What is compared, with which seeds and which shared budget."""

    methods: list[ZooMethod] = field(default_factory=list, metadata={"help": "the methods (rows), in table order"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds of every method "
                                                                                   "(trainer.seed; eval.seed + seed)"})
    budget: list[str] = field(default_factory=list, metadata={"help": "dotlist overrides every method with budget: "
                                                                      "true gets (steps, generations, learning rate)"})
    only: list[str] = field(default_factory=list, metadata={"help": "run only these methods (empty: all)"})
    cache: str = field(default="", metadata={"help": "directory of the cached cells ('': <output_dir>/cells); zoo "
                                                      "configs sharing one reuse each other's identical cells"})
    base_label: str = field(default="base (no training)", metadata={"help": "label of the untrained model's row "
                                                                              "('': no such row)"})

    def __post_init__(self):
        self.methods = [m if isinstance(m, ZooMethod) else _method(m, i) for i, m in enumerate(self.methods)]


def _method(raw, i: int) -> ZooMethod:
    try:
        return ZooMethod(**check_section(raw, ZooMethod, f"zoo.methods[{i}]", {}))
    except ConfigError as err:  # re-raised by load_config with the file's name
        hint = f" (did you mean '{err.suggestion}'?)" if err.suggestion else ""
        raise ValueError(f"{err.key}: {err.problem}{hint}") from None


@dataclass
class ZooRecipeConfig(RecipeConfig):
    """``model``, ``data`` and ``eval`` are shared by every method; ``zoo`` says what is compared."""

    zoo: ZooSection = field(default_factory=ZooSection, metadata={"help": "methods, seeds and the shared budget"})
    compact: list[str] = field(default_factory=list, metadata={"help": "overrides of this config that --compact "
                                                                       "applies (fewer methods, seeds, steps)"})
    output_dir: str = field(default="outputs/zoo", metadata={"help": "cells/, runs/, zoo.md, zoo.json, plots/"})


@dataclass
class Cell:
    method: str
    label: str
    seed: int
    path: Path                       # the cached JSON
    recipe: str | None = None        # None: the untrained model (the base row)
    config: RecipeConfig | None = None
    trained: str = ""


def schema_of(recipe: str) -> type[RecipeConfig]:
    module = importlib.import_module(f"recipes.{recipe}")
    found = {v for v in vars(module).values() if isinstance(v, type) and issubclass(v, RecipeConfig)
             and v is not RecipeConfig and v.trainer_class is not None}
    if len(found) != 1 or not callable(getattr(module, "run", None)):
        raise ValueError(f"recipes.{recipe} is not a training recipe")
    return found.pop()


def set_values(section) -> dict:
    """The fields of a config section that differ from their defaults: what a cell's key reads, so an
    option added to the schema later, at its default, keeps every cached cell.

    >>> from recipes.common.schema import EvalConfig
    >>> set_values(EvalConfig(num_samples=4))
    {'num_samples': 4}
    """
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        default = field_default(f)
        if default is dataclasses.MISSING or value != default:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def plan(cfg: ZooRecipeConfig, methods: list[str] | None = None, seeds: list[int] | None = None) -> list[Cell]:
    """Every (method, seed) cell with its validated config (before any model loads); methods whose
    config file does not exist are skipped with a logged line."""
    from .__main__ import recipe_names

    zoo, src = cfg.zoo, cfg.source
    names = [m.name for m in zoo.methods]
    if not zoo.methods:
        raise ConfigError(src, "zoo.methods", "at least one method is needed")
    if len(set(names)) < len(names) or "base" in names:
        raise ConfigError(src, "zoo.methods", f"method names must be unique and not 'base': {names}")
    for key, wanted in (("zoo.only", zoo.only), ("--methods", methods or [])):
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ConfigError(src if key == "zoo.only" else COMMAND_LINE, key,
                              f"unknown method(s) {unknown} (methods: {names})")
    seeds = list(zoo.seeds if seeds is None else seeds)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(src, "zoo.seeds", f"expected distinct seeds, got {seeds}")
    chosen = [m for m in zoo.methods if m.name in (methods or zoo.only or names)]
    root = Path(zoo.cache) if zoo.cache else Path(cfg.output_dir) / "cells"
    shared = {name: set_values(getattr(cfg, name)) for name in ("model", "data", "eval")}
    cells = [Cell("base", zoo.base_label, s, cell_path(root, "base", s, digest(shared))) for s in seeds] \
        if zoo.base_label else []
    for m in chosen:
        if not Path(m.config).is_file():
            logger.info("zoo: skip %s: its config %s does not exist (yet)", m.name, m.config)
            continue
        try:
            schema = schema_of(m.recipe) if m.recipe in recipe_names() else None
        except ValueError:
            schema = None
        if schema is None:
            raise ConfigError(src, f"zoo.methods[{names.index(m.name)}].recipe",
                              f"{m.recipe!r} is not a training recipe (python -m recipes list)")
        common = [*(zoo.budget if m.budget else []), *m.overrides, f"model.name_or_path={cfg.model.name_or_path}",
                  f"model.dtype={cfg.model.dtype}", f"data.path={cfg.data.path}", "data.eval_split=null"]
        raw = load_raw(m.config, common)[0]
        raw.get("trainer", {}).pop("output_dir", None)
        key = digest({**shared, "recipe": m.recipe, "method": raw, "trained": m.trained})
        for s in seeds:
            run_dir = Path(cfg.output_dir) / "runs" / m.name / f"seed{s}"
            config = load_config(schema, m.config, [*common, f"trainer.seed={s}", f"trainer.output_dir={run_dir}"])
            cells.append(Cell(m.name, m.label or m.name, s, cell_path(root, m.name, s, key), m.recipe, config,
                              m.trained))
    if not any(c.recipe for c in cells):
        raise ConfigError(src, "zoo.methods", "no method's config file exists (paths are relative to the working "
                                              f"directory, here {os.getcwd()})")
    return sorted(cells, key=lambda c: seeds.index(c.seed))  # seed-major: a run cut short has every method


def compute(cfg: ZooRecipeConfig, cell: Cell, test) -> dict:
    """Train the cell's method (its recipe, in this process), then evaluate the result."""
    from .common.evaluation import evaluate_model
    from .common.modeling import load_model, load_tokenizer
    from .plot import load_history

    start, history, model_path = time.perf_counter(), [], cfg.model.name_or_path
    if cell.recipe is not None:
        importlib.import_module(f"recipes.{cell.recipe}").run(cell.config)
        out = Path(cell.config.trainer.output_dir)
        history, model_path = load_history(out), str(out / cell.trained if cell.trained else out)
    trained = time.perf_counter()
    model_cfg = replace(cfg.model, name_or_path=model_path)
    model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg)
    report = evaluate_model(model, tokenizer, test, replace(cfg.eval, seed=cfg.eval.seed + cell.seed),
                            desc=f"{cell.method} seed {cell.seed}")
    logged = [h["rewards/math_accuracy/mean"] for h in history if "rewards/math_accuracy/mean" in h]
    if logged:
        report["train_accuracy"] = logged[-1]
    del model
    gc.collect()
    return {"method": cell.method, "label": cell.label, "seed": cell.seed, "recipe": cell.recipe, "model": model_path,
            "report": report, "history": history, "train_seconds": trained - start,
            "eval_seconds": time.perf_counter() - trained}


def run(cfg: ZooRecipeConfig, cells: list[Cell], compact: bool = False, cached: bool = False) -> dict:
    """Compute the missing cells (``cached``: leave them out, logged), then write the table (Markdown
    + JSON) and the plots."""
    from .common.data import load_split

    test = None
    results = []
    for n, cell in enumerate(cells, 1):
        result = read_cell(cell.path)
        if result is None and cached:
            logger.info("zoo: [%d/%d] %s seed %d: not computed yet, left out (--cached)", n, len(cells), cell.method,
                        cell.seed)
            continue
        if result is None:
            logger.info("zoo: [%d/%d] %s seed %d: computing", n, len(cells), cell.method, cell.seed)
            if test is None:
                test = load_split(cfg.data, cfg.data.eval_split or cfg.data.split, cfg.eval.max_rows, cfg.source)
            result = compute(cfg, cell, test)
            write_cell(cell.path, result)
            logger.info("zoo: %s seed %d: trained %.0f s, evaluated %.0f s", cell.method, cell.seed,
                        result["train_seconds"], result["eval_seconds"])
        else:
            logger.info("zoo: [%d/%d] %s seed %d: cached (%s)", n, len(cells), cell.method, cell.seed, cell.path.name)
        results.append(result)
    if not results:
        raise SystemExit("zoo: no computed cell to tabulate (run without --cached)")
    return write_outputs(cfg, results, cells, compact)


def write_outputs(cfg: ZooRecipeConfig, results: list[dict], cells: list[Cell], compact: bool) -> dict:
    from .plot import plot_bars, plot_curves

    out = Path(cfg.output_dir)
    table = aggregate(results)
    markdown = format_markdown(table, compact=compact)
    note = f"mean ± {SPREAD}; held-out {cfg.data.path} ({cfg.eval.max_rows} rows, {cfg.eval.num_samples} samples at " \
           f"T={cfg.eval.temperature})"
    save_config(cfg, out)
    (out / "zoo.md").write_text(markdown + "\n\n" + note + "\n")
    seconds = [{"method": r["method"], "seed": r["seed"], "train": r.get("train_seconds"), "eval": r.get("eval_seconds")}
               for r in results]
    (out / "zoo.json").write_text(json.dumps({"table": table, "spread": SPREAD, "seeds": sorted({c.seed for c in cells}),
                                              "cells": [str(c.path) for c in cells], "seconds": seconds},
                                             indent=2, default=str))
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    bars = {row["label"]: {short: (row["metrics"][m]["mean"], row["metrics"][m]["std"])
                           for m, short in (("greedy_accuracy", "greedy"), ("sampled_accuracy", "sampled"),
                                            ("vote_accuracy", "vote")) if m in row["metrics"]}
            for row in table.values()}
    written = [plot_bars(bars, plots, title=f"held-out accuracy, mean ± std over seeds ({cfg.output_dir})")]
    histories = {table[m]["label"]: mean_history([r["history"] for r in results if r["method"] == m]) for m in table}
    written += plot_curves({label: h for label, h in histories.items() if h}, plots)
    print(markdown + "\n\n" + note, flush=True)
    print("written: " + ", ".join(str(p) for p in [out / "zoo.md", out / "zoo.json", *written]), flush=True)
    return table


def _int_list(text: str, key: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(COMMAND_LINE, key, f"expected comma-separated integers, got {text!r}") from None


def configure(argv: list[str] | None = None) -> tuple[ZooRecipeConfig, list[Cell], argparse.Namespace]:
    """The config (``--compact``: with its ``compact`` overrides, then the command line's) and its cells."""
    parser = argparse.ArgumentParser(prog="python -m recipes.zoo", description=__doc__.split("\n\n")[0],
                                     epilog=schema_help(ZooRecipeConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="zoo YAML file (configs/zoo/...)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: zoo.only or all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: zoo.seeds)")
    parser.add_argument("--compact", action="store_true", help="apply the config's `compact` overrides; short table")
    parser.add_argument("--cached", action="store_true", help="compute nothing: tabulate the cells already cached")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for config errors")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved zoo config (YAML) and exit before anything trains")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides of the zoo config")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ZooRecipeConfig, args.config, args.overrides)
        if args.compact:
            cfg = load_config(ZooRecipeConfig, args.config, [*cfg.compact, *args.overrides])
        if args.print_config:
            print(config_yaml(cfg), end="", flush=True)
            sys.exit(0)
        methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        seeds = None if args.seeds is None else _int_list(args.seeds, "--seeds")
        return cfg, plan(cfg, methods, seeds), args
    except ConfigError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, cells, args = configure(argv)
    return run(cfg, cells, args.compact, args.cached)


if __name__ == "__main__":
    main()
