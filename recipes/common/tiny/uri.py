"""``tiny://`` URIs: parsing, the on-disk cache, and resolution to directories and datasets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from datasets import Dataset
from filelock import FileLock

from .models import FAMILIES, TinyModelSpec, build_tiny_model
from .choice import ChoiceSpec
from .code import CodeSpec, OutputPredictionSpec
from .samples import SamplesSpec, build_samples, load_samples
from .tasks import ArithmeticSpec, arithmetic_dataset
from .tokenizer import build_char_tokenizer

SCHEME = "tiny://"
TASKS = {"arith": ArithmeticSpec, "arithmetic": ArithmeticSpec}
DATASETS = {**TASKS, "samples": SamplesSpec}  # dataset URIs; `samples`: a tiny model's own answers (A-LoL data)
DATASETS.update(code=CodeSpec, cruxeval=OutputPredictionSpec)  # hand-written code tasks (recipes/common/tiny/code.py)
DATASETS.update(gpqa=ChoiceSpec)  # hand-written multiple choice in GPQA's layout (recipes/common/tiny/choice.py)
CACHE_VERSION = 1  # bump when what a spec builds changes


class TinyURIError(ValueError):
    """A malformed ``tiny://`` URI (unknown family, task or option, or a bad value)."""


@dataclasses.dataclass(frozen=True)
class WarmupSpec:
    """Supervised warm-up options of a ``tiny://family-task`` model URI."""

    steps: int = dataclasses.field(default=1200, metadata={"help": "optimizer steps"})
    lr: float = dataclasses.field(default=5e-4, metadata={"help": "peak learning rate"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "rows per step"})
    # A constant rate leaves the model in a flat enough region for RL steps to help; a cosine
    # decay to zero leaves it where one GRPO step along the gradient costs 10+ points of accuracy.
    schedule: str = dataclasses.field(
        default="constant_with_warmup", metadata={"help": "learning-rate schedule (constant_with_warmup, cosine, ...)"}
    )


def is_tiny(name: str) -> bool:
    return isinstance(name, str) and name.startswith(SCHEME)


def cache_dir() -> Path:
    return Path(os.environ.get("INTRINSIC_CACHE", Path.home() / ".cache" / "intrinsic"))


def _parse(uri: str) -> tuple[str, dict[str, str]]:
    if not is_tiny(uri):
        raise TinyURIError(f"not a tiny:// URI: {uri!r}")
    parts = urlsplit(uri)
    try:
        options = dict(parse_qsl(parts.query, strict_parsing=bool(parts.query)))
    except ValueError:
        raise TinyURIError(f"{uri!r}: malformed options (expected ?key=value&key=value)") from None
    return parts.netloc + parts.path, options


def _take(spec_cls: type, options: dict[str, str], uri: str):
    """Build ``spec_cls`` from the options it knows, removing them from ``options``."""
    kwargs = {}
    for f in dataclasses.fields(spec_cls):
        if f.name in options:
            raw = options.pop(f.name)
            try:
                kwargs[f.name] = (raw.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)(raw)
            except ValueError:
                raise TinyURIError(f"{uri!r}: option {f.name}={raw!r} is not a {type(f.default).__name__}") from None
    try:
        return spec_cls(**kwargs)
    except ValueError as err:
        raise TinyURIError(f"{uri!r}: {err}") from None


def _reject_leftovers(options: dict[str, str], uri: str, *specs: type) -> None:
    if options:
        valid = sorted(f.name for s in specs for f in dataclasses.fields(s))
        raise TinyURIError(f"{uri!r}: unknown option(s) {sorted(options)}; valid: {valid}")


def parse_model_uri(uri: str) -> tuple[TinyModelSpec, ArithmeticSpec | None, WarmupSpec | None]:
    """``tiny://family[-task]?options`` -> model spec, task spec and warm-up spec (or ``None``)."""
    name, options = _parse(uri)
    family, _, task = name.partition("-")
    if family not in FAMILIES:
        raise TinyURIError(f"{uri!r}: unknown tiny model family {family!r}; expected one of {list(FAMILIES)}")
    options.setdefault("family", family)
    model = _take(TinyModelSpec, options, uri)
    if not task:
        _reject_leftovers(options, uri, TinyModelSpec)
        return model, None, None
    if task not in TASKS:
        raise TinyURIError(f"{uri!r}: unknown tiny task {task!r}; expected one of {sorted(TASKS)}")
    if family == "t5":
        raise TinyURIError(f"{uri!r}: the supervised warm-up supports decoder-only families only")
    task_spec = _take(TASKS[task], options, uri)
    warmup = _take(WarmupSpec, options, uri)
    _reject_leftovers(options, uri, TinyModelSpec, TASKS[task], WarmupSpec)
    return model, task_spec, warmup


def _key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, *[dataclasses.asdict(p) for p in parts]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` once per ``target`` across processes, publishing atomically."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "DONE").exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
        try:
            build(tmp)
            (tmp / "DONE").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_random(spec: TinyModelSpec, directory: Path) -> None:
    build_tiny_model(spec).save_pretrained(directory)
    build_char_tokenizer(spec.max_positions).save_pretrained(directory)
    (directory / "tiny_spec.json").write_text(json.dumps({"model": spec.as_dict()}, indent=2))


def _warm_up(base: Path, task: ArithmeticSpec, warmup: WarmupSpec, directory: Path) -> None:
    """Supervised warm-up of ``base`` on ``task``: the sft recipe in a clean subprocess.

    A subprocess keeps the warm-up out of any distributed job that asked for the model (every
    rank waits on the lock while one trains) and runs the same code path as a user's SFT run.
    """
    query = "&".join(f"{k}={v}" for k, v in task.as_dict().items())
    config = {
        "description": "supervised warm-up of a tiny model (generated by tiny:// resolution)",
        "model": {"name_or_path": str(base)},
        "data": {"path": f"{SCHEME}arithmetic?{query}", "prompt": "plain"},
        "eval": {"max_rows": 200, "before_training": False},
        "trainer": {
            "output_dir": str(directory),
            "max_steps": warmup.steps,
            "learning_rate": warmup.lr,
            "per_device_train_batch_size": warmup.batch_size,
            "lr_scheduler_type": warmup.schedule,
            "warmup_steps": max(1, warmup.steps // 20),
            "weight_decay": 0.0,
            "logging_steps": max(1, warmup.steps // 10),
            "save_strategy": "no",
            "report_to": [],
            "seed": 0,
            "dataloader_num_workers": 0,
        },
    }
    (directory / "warmup.yaml").write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_", "MASTER_", "WORLD_", "RANK"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH", "")])
    print(f"[tiny] warming up {base.name} on {task} for {warmup.steps} steps (cached after this run)", flush=True)
    subprocess.run([sys.executable, "-m", "recipes.sft", "--config", str(directory / "warmup.yaml")], check=True, env=env)


def resolve_tiny_model(uri: str) -> str:
    """The directory of the model named by ``uri``, building (and warming up) it if needed."""
    model, task, warmup = parse_model_uri(uri)
    root = cache_dir() / "tiny"
    base = _build_once(root / f"{model.family}-{_key(model)}", lambda d: _save_random(model, d))
    if task is None:
        return str(base)
    target = root / f"{model.family}-{type(task).__name__.lower()}-{_key(model, task, warmup)}"
    return str(_build_once(target, lambda d: _warm_up(base, task, warmup, d)))


def parse_dataset_uri(uri: str) -> ArithmeticSpec | SamplesSpec:
    """``tiny://task?options`` -> the task's spec."""
    name, options = _parse(uri)
    if name not in DATASETS:
        raise TinyURIError(f"{uri!r}: unknown tiny task {name!r}; expected one of {sorted(DATASETS)}")
    spec = _take(DATASETS[name], options, uri)
    _reject_leftovers(options, uri, DATASETS[name])
    if isinstance(spec, SamplesSpec):
        parse_model_uri(spec.model_uri)
    return spec


def resolve_tiny_dataset(uri: str, split: str) -> Dataset:
    """The ``split`` of the generated task named by ``uri`` (``tiny://arithmetic?...``)."""
    spec = parse_dataset_uri(uri)
    try:
        if isinstance(spec, SamplesSpec):
            model_dir = resolve_tiny_model(spec.model_uri)
            target = cache_dir() / "tiny" / f"samples-{_key(spec)}-{Path(model_dir).name[-16:]}"
            return load_samples(_build_once(target, lambda d: build_samples(spec, model_dir, d)), split)
        if isinstance(spec, CodeSpec | OutputPredictionSpec | ChoiceSpec):
            return spec.dataset(split)
        return arithmetic_dataset(spec, split)
    except ValueError as err:
        raise TinyURIError(f"{uri!r}: {err}") from None
