"""Evaluate one or more models on held-out data: accuracy, self-consistency and signal calibration in one table.

    python -m recipes.evaluate --config configs/evaluate/tiny_arithmetic.yaml
    python -m recipes.evaluate --compare outputs/evaluate/a outputs/rlif/b ...   # eval.json files side by side
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainers.distributed import Ranks

from .common.cli import Command, main
from .common.config import save_config
from .common.data import load_split
from .common.errors import ConfigError
from .common.evaluation import code_grading, evaluate_model, format_table, read_reports, write_report
from .common.modeling import load_model, load_tokenizer, to_device
from .common.schema import RecipeConfig
from .common.vllm_backend import check_backend, engine_for, release_engine


@dataclass
class EvaluateRecipeConfig(RecipeConfig):
    """``model`` is evaluated, then every entry of ``compare`` (same loading options)."""

    compare: dict[str, str] = field(default_factory=dict, metadata={"help": "row label -> model name_or_path"})
    label: str = field(default="model", metadata={"help": "row label of `model`"})
    output_dir: str = field(default="outputs/evaluate", metadata={"help": "where eval.json and config.yaml go"})


def run(cfg: EvaluateRecipeConfig) -> dict:
    test = load_split(cfg.data, cfg.data.eval_split or cfg.data.split, cfg.eval.max_rows, cfg.source)
    try:  # a code grader's columns are checked before any model loads
        code_grading(test, cfg.eval)
    except ValueError as err:
        raise ConfigError(cfg.source, "eval.grader", str(err)) from None
    models = {**{label: replace(cfg.model, name_or_path=path) for label, path in cfg.compare.items()}, cfg.label: cfg.model}
    for label, model_cfg in models.items():  # run outputs named here must exist before anything loads
        name = model_cfg.name_or_path
        if name.startswith(("outputs/", "./", "/")) and not Path(name).exists():
            key = "model.name_or_path" if label == cfg.label else f"compare.{label}"
            raise ConfigError(cfg.source, key, f"no model at {name} (train it first)")
    reports, ranks = {}, Ranks()  # under `accelerate launch` the rows are dealt over the processes
    check_backend(cfg.eval, ranks, cfg.source)  # before any model loads
    for label, model_cfg in models.items():
        model, tokenizer = to_device(load_model(model_cfg), ranks.device), load_tokenizer(model_cfg)
        engine = engine_for(cfg.eval, model_cfg, ranks=ranks, source=cfg.source)  # eval.backend: vllm
        reports[label] = evaluate_model(model, tokenizer, test, cfg.eval, desc=label, ranks=ranks, engine=engine)
        del engine
        release_engine()
    if not ranks.main:
        return {}
    save_config(cfg, cfg.output_dir)
    print(f"held-out: {cfg.data.path} split={cfg.data.eval_split} rows={len(test)} "
          f"sampling T={cfg.eval.temperature} x{cfg.eval.num_samples}")
    print(format_table(reports), flush=True)
    meta = {"models": {label: m.name_or_path for label, m in models.items()},
            "data": {**dataclasses.asdict(cfg.data), "fingerprint": getattr(test, "_fingerprint", None),
                     "rows": len(test)},
            "config": dataclasses.asdict(replace(cfg, trainer={}))}
    print(f"report: {write_report(reports, Path(cfg.output_dir), meta)}")
    return reports


def compare(paths: list[str]) -> str:
    """One table from several ``eval.json`` files (or run directories): rows ``<run>/<label>``."""
    if not paths:
        raise SystemExit("usage: python -m recipes.evaluate --compare RUN_DIR_OR_EVAL_JSON [...]")
    rows = {}
    for path in paths:
        run = Path(path).parent.name if Path(path).suffix == ".json" else Path(path).name
        for label, report in read_reports(path).items():
            rows[f"{run}/{label}"] = report
    return format_table(rows)


def print_comparison(paths: list[str]) -> None:
    print(compare(paths))


COMPARE = Command("--compare", "RUN", "print the eval.json files (or run directories) given side by side as one "
                                     "table, rows <run>/<label>; needs no --config", print_comparison)

if __name__ == "__main__":
    main("evaluate", EvaluateRecipeConfig, run, commands=(COMPARE,))
