"""Values the types cannot check: ranges, paths, the model's depth, what this machine can do.

Run by :func:`recipes.common.config.load_config` once every key has its type, before any model
weights or data rows load; each problem is a :class:`~recipes.common.errors.ConfigError` naming
the file that set the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

from rewards import get_reward_class

from .errors import ConfigError, origin_of, section_named
from .schema import DataConfig, EvalConfig, ModelConfig, RecipeConfig, RewardSpec


# trainer field -> (test, what it must be); checked when the recipe's TRL config class has the field
TRAINER_RANGES: dict[str, tuple[typing.Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "warmup_steps": (lambda v: v >= 0, ">= 0 (a float < 1 is a ratio)"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "num_generations": (lambda v: v >= 1, ">= 1"),
    "num_iterations": (lambda v: v >= 1, ">= 1"),
    "max_completion_length": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "beta": (lambda v: v >= 0, ">= 0"),
    "epsilon": (lambda v: v >= 0, ">= 0"),
    "ddp_timeout": (lambda v: v >= 1, ">= 1 (seconds)"),
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_range(origins: dict[tuple, str], key: str, value: Any, test, expected: str) -> None:
    if _number(value) and not test(value):
        raise ConfigError(origin_of(origins, key), key, f"must be {expected}, got {value!r}")


def check_trainer_values(trainer: Any, origins: dict[tuple, str]) -> None:
    """Optimizer and batch values TRL/transformers accept but that fail later (a negative learning
    rate raises in the optimizer after the model loaded) or train nothing."""
    for name, (test, expected) in TRAINER_RANGES.items():
        _check_range(origins, f"trainer.{name}", getattr(trainer, name, None), test, expected)
    if getattr(trainer, "max_steps", -1) <= 0:
        _check_range(origins, "trainer.num_train_epochs", getattr(trainer, "num_train_epochs", None), lambda v: v > 0,
                     "> 0 (or set trainer.max_steps)")


def check_eval_values(ev: EvalConfig, origins: dict[tuple, str], key: str = "eval") -> None:
    from rewards import LENS_SIGNALS

    for name, test, expected in (("max_rows", lambda v: v >= 1, ">= 1 or null"), ("batch_size", lambda v: v >= 1, ">= 1"),
                                 ("max_new_tokens", lambda v: v >= 1, ">= 1"), ("num_samples", lambda v: v >= 1, ">= 1"),
                                 ("temperature", lambda v: v > 0, "> 0"), ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")):
        _check_range(origins, f"{key}.{name}", getattr(ev, name), test, expected)
    for k in ev.pass_k:
        _check_range(origins, f"{key}.pass_k", k, lambda v: 1 <= v <= ev.num_samples, f"in 1..num_samples ({ev.num_samples})")
    for name in ("every_steps", "every_rows"):
        _check_range(origins, f"{key}.{name}", getattr(ev, name, None), lambda v: v >= 1, ">= 1 or null")
    if ev.backend == "vllm" and not vllm_installed():
        raise ConfigError(origin_of(origins, f"{key}.backend"), f"{key}.backend",
                          "vLLM is not installed: pip install -e '.[vllm]' (or set eval.backend=hf)")
    if ev.perplexity_consistency and (ev.num_samples < 2 or not ev.sampled):
        raise ConfigError(origin_of(origins, f"{key}.perplexity_consistency"), f"{key}.perplexity_consistency",
                          f"perplexity consistency scores a group of samples: set {key}.sampled=true and "
                          f"{key}.num_samples > 1 (got {ev.num_samples})")
    modes = [m[3:] for m in LENS_SIGNALS]
    if ev.ic_mode not in modes:
        close = difflib.get_close_matches(ev.ic_mode, modes, n=1)
        raise ConfigError(origin_of(origins, f"{key}.ic_mode"), f"{key}.ic_mode", f"expected one of {modes}, got {ev.ic_mode!r}",
                          close[0] if close else None)


def vllm_installed() -> bool:
    """Whether ``import vllm`` would find a module (without importing it: vLLM is slow to import)."""
    import importlib.util
    import sys

    if "vllm" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def check_model_options(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """``model.quantization`` / ``model.adapter`` / ``peft``: refused where nothing could honour them
    (no GPU for 4-bit loading; 4-bit weights with nothing trainable on top; a LoRA on a LoRA)."""
    from trainers.distributed import no_accelerator

    trains = type(cfg).trainer_class is not None
    if cfg.model.quantization is not None:
        key = "model.quantization"
        if no_accelerator():
            raise ConfigError(origin_of(origins, key), key, "4-bit loading (bitsandbytes, QLoRA) needs a CUDA GPU and there "
                                                          "is none here; set model.quantization=null (or use --dry-run)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(origin_of(origins, key), key, "4-bit loading needs bitsandbytes: pip install bitsandbytes") from None
        if trains and cfg.peft is None and not cfg.model.adapter:
            raise ConfigError(origin_of(origins, key), key, "4-bit weights cannot be trained: add a peft: section (QLoRA) "
                                                          "or a model.adapter to train on top of them")
    if cfg.eval.backend == "vllm" and cfg.peft is not None and trains:
        raise ConfigError(origin_of(origins, "eval.backend"), "eval.backend", "the run saves a LoRA adapter, which vLLM "
                                                                            "generation does not load: set eval.backend=hf")
    if cfg.eval.backend == "vllm" and cfg.model.adapter:
        raise ConfigError(origin_of(origins, "eval.backend"), "eval.backend", "vLLM generation loads model.name_or_path "
                                                                            "alone: merge the adapter first, or set eval.backend=hf")
    if cfg.peft is not None and cfg.model.adapter:
        raise ConfigError(origin_of(origins, "peft"), "peft", "model.adapter is trained further as it is; a second LoRA "
                                                            "(peft) on top of it is not supported: set peft=null")
    if cfg.peft is not None and not trains:
        raise ConfigError(origin_of(origins, "peft"), "peft", "this recipe trains nothing: a LoRA (peft) section would be "
                                                            "ignored; remove it (model.adapter evaluates an adapter)")
    if cfg.model.adapter:
        path = Path(os.path.expanduser(cfg.model.adapter))
        if (path.exists() or _looks_local(cfg.model.adapter)) and not (path / "adapter_config.json").is_file():
            raise ConfigError(origin_of(origins, "model.adapter"), "model.adapter",
                              f"no PEFT adapter (adapter_config.json) in {cfg.model.adapter}")
    p = cfg.peft
    if p is not None:
        for name, value, test, expected in (("r", p.r, lambda v: v >= 1, ">= 1"), ("alpha", p.alpha, lambda v: v > 0, "> 0"),
                                            ("dropout", p.dropout, lambda v: 0 <= v < 1, "in [0, 1)")):
            _check_range(origins, f"peft.{name}", value, test, expected)


def config_depth(config: dict) -> int | None:
    """Decoder blocks of a transformers config (as a dict): ``num_hidden_layers`` and its aliases,
    the decoder's for encoder-decoders, the text model's for multimodal configs.

    >>> config_depth({"num_hidden_layers": 24}), config_depth({"is_encoder_decoder": True, "num_layers": 6,
    ...                                                          "num_decoder_layers": 2}), config_depth({})
    (24, 2, None)
    """
    keys = ("num_decoder_layers", "decoder_layers") if config.get("is_encoder_decoder") else ()
    for key in (*keys, "num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    for key in ("text_config", "decoder"):
        if isinstance(config.get(key), dict):
            return config_depth(config[key])
    return None


def model_depth(cfg: ModelConfig) -> int | None:
    """The model's decoder depth read from its config alone, no weights: a ``tiny://`` URI's
    options, a local directory's ``config.json``, else the Hub's config (``None`` if unreadable)."""
    import json

    from .tiny import is_tiny, parse_model_uri

    if is_tiny(cfg.name_or_path):
        return parse_model_uri(cfg.name_or_path)[0].layers
    path = Path(os.path.expanduser(cfg.name_or_path)) / "config.json"
    try:
        if path.is_file():
            return config_depth(json.loads(path.read_text()))
        from transformers import AutoConfig

        return config_depth(AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                                       trust_remote_code=cfg.trust_remote_code).to_dict())
    except Exception:  # offline, gated, unusual config: the loader will say what is wrong
        return None


def _layer_settings(cfg: RecipeConfig) -> list[tuple[str, list[int], int]]:
    """(key, layers, lowest valid) of every setting that names decoder layers by number."""
    from rewards import Clue, InternalConsistency

    out = []
    if cfg.eval.internal_consistency and cfg.eval.ic_layers:
        out.append(("eval.ic_layers", list(cfg.eval.ic_layers), 1))
    for f in dataclasses.fields(cfg):
        specs = getattr(cfg, f.name)
        if not (isinstance(specs, list) and specs and all(isinstance(s, RewardSpec) for s in specs)):
            continue
        for i, spec in enumerate(specs):
            layers = spec.kwargs.get("layers")
            if isinstance(layers, list) and issubclass(get_reward_class(spec.name), (InternalConsistency, Clue)):
                out.append((f"{f.name}[{i}].kwargs.layers", layers, 1))
    return out


def check_depth(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """Layer numbers within the model's depth, read from its config before any weights load:
    internal-consistency layers (1-based, last included) and any section with ``check_depth(L)``
    (DeCRED's auxiliary heads)."""
    settings = _layer_settings(cfg)
    sections = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if hasattr(getattr(cfg, f.name), "check_depth")]
    if not settings and not sections or cfg.model.name_or_path == "scratch":
        return
    depth = model_depth(cfg.model)
    if depth is None:
        return
    for key, layers, low in settings:
        bad = [layer for layer in layers if not isinstance(layer, int) or not low <= layer <= depth]
        if bad:
            raise ConfigError(origin_of(origins, key), key, f"layers {bad} outside 1..{depth}: {cfg.model.name_or_path} "
                                                          f"has {depth} decoder layers")
    for name, section in sections:
        try:
            section.check_depth(depth)
        except ValueError as err:
            key = section_named(err, {name: None}) or name
            raise ConfigError(origin_of(origins, key), key, str(err).splitlines()[0]) from None


def check_data_values(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    from .data import prompt_template

    for name in ("data",) + tuple(f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), DataConfig)
                                  and f.name != "data"):
        data = getattr(cfg, name)
        _check_range(origins, f"{name}.max_rows", data.max_rows, lambda v: v >= 1, ">= 1 or null")
        try:
            prompt_template(data.prompt)
        except KeyError as err:
            raise ConfigError(origin_of(origins, f"{name}.prompt"), f"{name}.prompt", err.args[0]) from None
        check_choices(data, origins, name)


def check_choices(data: DataConfig, origins: dict[tuple, str], name: str = "data") -> None:
    """``data.choices``: 2..26 distinct option columns, and the gold letter as the only ``answer``."""
    choices = data.choices
    if choices is None:
        return
    key = f"{name}.choices"
    options = [choices.correct, *choices.incorrect]
    if not 1 <= len(choices.incorrect) <= 25:
        raise ConfigError(origin_of(origins, f"{key}.incorrect"), f"{key}.incorrect",
                          f"expected 1..25 columns of wrong options, got {len(choices.incorrect)}")
    if len(set(options)) < len(options):
        raise ConfigError(origin_of(origins, key), key, f"an option column is named twice: {options}")
    if "answer" in data.columns:
        raise ConfigError(origin_of(origins, f"{name}.columns.answer"), f"{name}.columns.answer",
                          "data.choices makes the gold letter the answer column: remove this mapping")


def check_periodic_eval(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """``eval.every_steps`` needs a recipe that evaluates during training and held-out data to evaluate."""
    if cfg.eval.every_steps is None:
        return
    key, source = "eval.every_steps", origin_of(origins, "eval.every_steps")
    if not type(cfg).evaluates_during_training:
        raise ConfigError(source, key, f"{type(cfg).__module__} does not evaluate during training (rlif, intuitor, sft "
                                       "and alol do); set eval.every_steps=null")
    if not (cfg.data.eval_split or getattr(cfg, "eval_data", None) or getattr(cfg, "eval_sets", None)):
        raise ConfigError(source, key, "needs held-out data: set data.eval_split (or eval_data / eval_sets)")


def check_values(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """Every value check that needs no model weights and no data rows (run by :func:`load_config`)."""
    if type(cfg).trainer_class is not None and not isinstance(cfg.trainer, dict):
        check_trainer_values(cfg.trainer, origins)
    check_eval_values(cfg.eval, origins)
    check_periodic_eval(cfg, origins)
    check_data_values(cfg, origins)
    check_model_options(cfg, origins)
    check_depth(cfg, origins)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith((".json", ".jsonl", ".parquet", ".csv", ".yaml"))


def check_paths(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """``tiny://`` URIs must parse; paths that can only be local (absolute, relative, or with a
    file suffix) must exist."""
    from .tiny import TinyURIError, is_tiny, parse_dataset_uri, parse_model_uri

    for key, value, parse in (
        ("model.name_or_path", cfg.model.name_or_path, parse_model_uri),
        ("data.path", cfg.data.path, parse_dataset_uri),
    ):
        if is_tiny(value):
            try:
                parse(value)
            except TinyURIError as err:
                raise ConfigError(origin_of(origins, key), key, str(err)) from None
        elif _looks_local(value):
            path = Path(os.path.expanduser(value))
            if not path.is_absolute():
                path = Path.cwd() / path
            if not path.exists():
                raise ConfigError(origin_of(origins, key), key, f"file not found: {value}")
        check_local_path(key, value, origin_of(origins, key))


def check_local_path(key: str, value: str, source: str) -> None:
    """A local model directory holds a ``config.json`` (or a PEFT adapter's); a local data file has a
    type we read."""
    from .data import FILE_TYPES

    path = Path(os.path.expanduser(value))
    if key == "model.name_or_path" and path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise ConfigError(source, key, f"{value} is a directory without a config.json (not a saved model)")
    if key == "data.path" and path.is_file() and path.suffix not in FILE_TYPES:
        raise ConfigError(source, key, f"{value}: unsupported file type {path.suffix!r} (use {sorted(FILE_TYPES)})")
