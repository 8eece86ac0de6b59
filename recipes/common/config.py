"""Recipe configs: OmegaConf YAML -> validated, typed objects.

Loading: the YAML file's ``base:`` list (paths relative to the file) is merged in order,
then the file itself, then ``key=value`` overrides from the command line; ``${...}``
interpolations are resolved last. Validation happens before any model or dataset loads:
the types here (every key against its section's dataclass in :mod:`recipes.common.schema`),
the values the types cannot check in :mod:`recipes.common.checks`; every problem becomes a
:class:`~recipes.common.errors.ConfigError`, printed as one line that names the file, the key
path, what was expected and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rewards import UnknownRewardError, get_reward_class
from rewards.transform import check_transform

from .checks import check_paths, check_values
from .errors import COMMAND_LINE, ConfigError, key_parts, origin_of, section_named
from .schema import RecipeConfig, RewardSpec, dataclass_in, describe, type_hints


# --------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------


def _load_yaml(path: Path, origins: dict[tuple, str], seen: tuple[Path, ...] = ()) -> DictConfig:
    """``path`` merged over its ``base:`` files; records which file set each key in ``origins``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(str(path), "base", "circular base inheritance")
    try:
        own = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(str(seen[-1]) if seen else str(path), "base" if seen else "", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "", "is a directory, not a YAML file") from None
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:  # yaml syntax, duplicate keys, tabs
        raise ConfigError(str(path), "", f"invalid YAML: {yaml_problem(err, path.read_text(errors='replace'))}") from None
    if not isinstance(own, DictConfig):
        raise ConfigError(str(path), "", "expected a mapping of sections at the top level")
    bases = own.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list):
        raise ConfigError(str(path), "base", "expected a list of relative paths")
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml(path.parent / str(base), origins, (*seen, path)))
    _record_origins(own, str(path), origins)
    return OmegaConf.merge(merged, own)


def yaml_problem(err: Exception, text: str = "") -> str:
    """One line for a YAML error: the problem and where (``found duplicate key x (line 3, column 1)``);
    ``text``: the document, to point out a tab."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        lines = text.splitlines()
        tab = mark.line < len(lines) and "\t" in lines[mark.line]
        hint = " (a tab: YAML indents with spaces)" if tab else ""
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1}){hint}"
    return (str(err).splitlines() or [type(err).__name__])[0]


def _record_origins(node: Any, source: str, origins: dict[tuple, str], prefix: tuple = ()) -> None:
    origins[prefix] = source
    if isinstance(node, DictConfig):
        for key in node.keys():
            _record_origins(node._get_node(key), source, origins, (*prefix, str(key)))


def load_raw(path: str | os.PathLike, overrides: list[str] = ()) -> tuple[dict, dict[tuple, str]]:
    """Merged, interpolated config as plain containers, and the file that set each key."""
    origins: dict[tuple, str] = {}
    cfg = _load_yaml(Path(path), origins)
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq or not key:
            raise ConfigError(COMMAND_LINE, override, "expected an override of the form key.path=value")
        try:
            parsed = OmegaConf.from_dotlist([f"_={value}"])["_"]  # YAML typing: 1e-6, true, [a, b], {k: v}
            clear = isinstance(parsed, DictConfig) and not parsed  # `key={}` empties a mapping (a merge would keep it)
            OmegaConf.update(cfg, key, parsed, merge=not clear, force_add=True)
        except (OmegaConfBaseException, TypeError, ValueError, yaml.YAMLError) as err:
            raise ConfigError(COMMAND_LINE, key, f"cannot apply override: {yaml_problem(err)}") from None
        _record_origins(OmegaConf.select(cfg, key), COMMAND_LINE, origins, key_parts(key))
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(origin_of(origins, key), key, f"cannot resolve interpolation: {str(err).splitlines()[0]}") from None
    return raw, origins


# --------------------------------------------------------------------------------------------
# Validation against dataclasses
# --------------------------------------------------------------------------------------------


_NO = object()


def coerce(value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp`` (numeric strings become numbers); ``_NO`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, str | typing.TypeVar):
        return value
    if tp is type(None):
        return None if value is None else _NO
    if origin in (typing.Union, types.UnionType):
        # try exact-type branches first so "1" stays a str where str is allowed
        for branch in sorted(args, key=lambda a: a is not str):
            out = coerce(value, branch)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        return value if value in args else _NO
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        if not isinstance(value, list | tuple):
            return _NO
        item_tp = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else Any
        items = [coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = {m.value for m in tp}
        return value if value in values or isinstance(value, tp) else _NO
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, dict) else _NO
    return value  # an annotation we do not model: accept


def check_section(section: dict, cls: type, key: str, origins: dict[tuple, str], strict_required: bool = True) -> dict:
    """Validate a mapping against dataclass ``cls``: unknown keys, types, required fields."""
    if not isinstance(section, dict):
        raise ConfigError(origin_of(origins, key), key, f"expected {describe(cls)}, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = type_hints(cls)
    out = {}
    for name, value in section.items():
        path = f"{key}.{name}" if key else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.5)
            raise ConfigError(
                origin_of(origins, path), path, f"unknown key for {cls.__name__}", f"{key + '.' if key else ''}{close[0]}" if close else None
            )
        tp = hints.get(name, Any)
        inner = dataclass_in(tp)
        if inner is not None and isinstance(value, dict):
            out[name] = check_section(value, inner, path, origins)
            continue
        coerced = coerce(value, tp)
        if coerced is _NO:
            raise ConfigError(origin_of(origins, path), path, f"expected {describe(tp)}, got {value!r}")
        out[name] = coerced
    if strict_required:
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in out:
                path = f"{key}.{name}" if key else name
                raise ConfigError(origin_of(origins, key), path, f"missing required key ({describe(hints.get(name, Any))})")
    return out


def _build(cls: type, values: dict) -> Any:
    hints = type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        inner = dataclass_in(hints.get(name, Any))
        kwargs[name] = _build(inner, value) if inner is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def build_trainer_args(trainer_class: type, values: dict, source: str, output_dir: str | None = None):
    """The recipe's TRL config object from the ``trainer:`` section (mixed precision off on CPU)."""
    values = dict(values)
    values.setdefault("output_dir", output_dir or "outputs/run")
    from trainers.distributed import no_accelerator

    if no_accelerator():  # CPU machine: gloo process groups under accelerate launch, float32
        values.setdefault("use_cpu", True)
        values.setdefault("bf16", False)
        for key in ("bf16", "fp16"):
            if values.get(key):
                logging.getLogger("intrinsic").warning("%s requested but no GPU here: training in float32", key)
                values[key] = False
    try:
        return trainer_class(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(source, "trainer", str(err).splitlines()[0]) from None


def validate_rewards(rewards: list, origins: dict[tuple, str], section: str = "rewards") -> list[RewardSpec]:
    specs = []
    for i, raw in enumerate(rewards or []):
        key = f"{section}[{i}]"
        if isinstance(raw, str):
            raw = {"name": raw}
        values = check_section(raw, RewardSpec, key, origins)
        try:
            get_reward_class(values["name"])
        except UnknownRewardError as err:
            raise ConfigError(origin_of(origins, f"{section}.{i}.name"), f"{key}.name", str(err)) from None
        try:
            check_transform(values.get("transform"))
        except ValueError as err:
            raise ConfigError(origin_of(origins, f"{section}.{i}.transform"), f"{key}.transform", str(err)) from None
        specs.append(RewardSpec(**values))
    return specs


def load_config(schema: type[RecipeConfig], path: str | os.PathLike, overrides: list[str] = ()) -> RecipeConfig:
    """Load, merge, validate and build a recipe config (raises :class:`ConfigError`)."""
    raw, origins = load_raw(path, overrides)
    hints = type_hints(schema)
    reward_lists = [f.name for f in dataclasses.fields(schema) if hints.get(f.name) == list[RewardSpec]]
    rewards_raw = {name: raw.pop(name, None) for name in reward_lists}  # `rewards` and any other list of rewards
    trainer_raw = raw.pop("trainer", None) or {}
    if isinstance(trainer_raw, dict) and isinstance(trainer_raw.get("resume_from_checkpoint"), bool):  # `true`: the last checkpoint
        trainer_raw["resume_from_checkpoint"] = str(trainer_raw["resume_from_checkpoint"]).lower()
    values = check_section(raw, schema, "", origins)
    values["source"] = str(path)
    for name, value in rewards_raw.items():
        if value is not None and not isinstance(value, list):
            raise ConfigError(origin_of(origins, name), name, "expected a list of rewards")
        values[name] = validate_rewards(value, origins, name)
    try:
        cfg = _build(schema, values)
    except (TypeError, ValueError) as err:  # a section's own __post_init__ check (e.g. decred.layers)
        raise ConfigError(str(path), section_named(err, values), str(err).splitlines()[0]) from None
    if schema.trainer_class is not None:
        trainer_values = check_section(trainer_raw, schema.trainer_class, "trainer", origins, strict_required=False)
        cfg.trainer = build_trainer_args(schema.trainer_class, trainer_values, origin_of(origins, "trainer"))
        cfg._trainer_given = frozenset(trainer_values)  # which of TRL's derived pairs config.yaml keeps
    check_paths(cfg, origins)
    check_values(cfg, origins)
    return cfg


DERIVED_PAIRS = (("generation_batch_size", "steps_per_generation"),)
"""TRL config fields computed from each other after loading; a config may set only one of each pair."""


def config_yaml(cfg: RecipeConfig, trainer: dict | None = None) -> str:
    """The resolved config as YAML, every section with its defaults (not ``source``); ``trainer:``
    as given in ``trainer`` (``--print-config``: the merged, resolved section, which loads back to
    the same TRL config) or else every plain value of the built TRL config (``config.yaml``)."""
    data = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "source":
            continue
        if f.name == "trainer" and trainer is not None:
            value = trainer
        elif f.name == "trainer" and hasattr(value, "to_dict"):
            value = {k: v for k, v in value.to_dict().items() if _plain(v)}
            given = getattr(cfg, "_trainer_given", frozenset())
            for a, b in DERIVED_PAIRS:  # TRL refuses both set: keep the one the config gave
                if a in value and b in value:
                    value.pop(b if a in given else a)
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        data[f.name] = value
    return OmegaConf.to_yaml(OmegaConf.create(data))


def save_config(cfg: RecipeConfig, directory: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` so the run can be repeated exactly."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(config_yaml(cfg))
    return path


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool) or (
        isinstance(value, list | dict) and all(_plain(v) for v in (value.values() if isinstance(value, dict) else value))
    )
