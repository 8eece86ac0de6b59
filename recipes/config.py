"""Recipe configs: OmegaConf YAML -> validated, typed objects.

Loading: the YAML file's ``base:`` list (paths relative to the file) is merged in order,
then the file itself, then ``key=value`` overrides from the command line; ``${...}``
interpolations are resolved last. Validation happens before any model or dataset loads:
every problem becomes a :class:`ConfigError`, printed as one line that names the file, the
key path, what was expected and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rewards import UnknownRewardError, get_reward_class

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config problem, rendered as ``file: key: problem (did you mean 'x'?)``."""

    def __init__(self, source: str, key: str, problem: str, suggestion: str | None = None):
        self.source, self.key, self.problem, self.suggestion = source, key, problem, suggestion
        hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
        super().__init__(f"{source}: {key or '<root>'}: {problem}{hint}")


# --------------------------------------------------------------------------------------------
# Sections shared by every recipe
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizationSection:
    """4-bit bitsandbytes quantisation of the frozen base weights (QLoRA)."""

    bits: Literal[4] = field(default=4, metadata={"help": "weight bits (4)"})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type"})
    compute_dtype: Literal["bfloat16", "float16", "float32"] = field(default="bfloat16", metadata={"help": "matmul dtype"})
    double_quant: bool = field(default=True, metadata={"help": "quantise the quantisation constants too"})


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = field(metadata={"help": "Hub name, local directory, or tiny://family[-task]?opts"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype (auto: as saved)"}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom modelling code from the Hub"})
    quantization: QuantizationSection | None = field(
        default=None, metadata={"help": "bitsandbytes 4-bit loading (QLoRA; needs a CUDA GPU); null: none"}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "PEFT adapter (Hub or directory) loaded onto the model and trained further"}
    )


@dataclass
class LoraConfigSection:
    """LoRA adapter; ``peft: null`` (the default) means a full fine-tune."""

    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] | str = field(default="all-linear", metadata={"help": "modules to adapt"})


@dataclass
class DataConfig:
    """Where the data come from and how rows become prompts."""

    path: str = field(metadata={"help": "Hub dataset, local directory/file (.json/.jsonl/.parquet/.csv), or tiny://task?opts"})
    name: str | None = field(default=None, metadata={"help": "dataset subset (Hub config name)"})
    split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str | None = field(default="test", metadata={"help": "held-out split used for evaluation"})
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "our column name -> the dataset's column (question, answer, completion)"}
    )
    prompt: str = field(default="plain", metadata={"help": "named template or inline template using {question} (and other columns: {input})"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message; makes prompts conversational"})
    conversational: bool = field(default=False, metadata={"help": "wrap prompts as chat messages"})
    max_rows: int | None = field(default=None, metadata={"help": "keep at most this many training rows"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (commit, tag or branch)"})
    fallback: str | None = field(
        default=None, metadata={"help": "local directory or file to read when the Hub dataset cannot be loaded"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Hub dataset sub-directory (e.g. hh-rlhf's helpful-base)"})
    split_on: str | None = field(
        default=None,
        metadata={"help": "split each question at the last occurrence of this marker: the text up to and including it "
                          "is the question, the rest the completion (e.g. '\\n\\nAssistant:' for Anthropic HH)"},
    )


@dataclass
class RewardSpec:
    """One reward: registered name or dotted path, weight, constructor keyword arguments."""

    name: str = field(metadata={"help": "registered reward name or dotted path to a class"})
    weight: float = field(default=1.0, metadata={"help": "weight in the total reward (0: logged only)"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of the reward class"})


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy and sampled accuracy, self-consistency, internal signals."""

    max_rows: int | None = field(default=200, metadata={"help": "held-out rows to evaluate (null: all)"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generation batch"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget per answer"})
    greedy: bool = field(default=True, metadata={"help": "report greedy accuracy"})
    sampled: bool = field(default=True, metadata={"help": "report sampled accuracy"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature for sampled accuracy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling for sampled accuracy"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt for sampled accuracy"})
    pass_k: list[int] = field(
        default_factory=list, metadata={"help": "k values of the unbiased pass@k (empty: 1 and num_samples)"}
    )
    self_certainty: bool = field(
        default=False, metadata={"help": "report self-certainty of correct vs incorrect sampled answers"}
    )
    negative_entropy: bool = field(
        default=False, metadata={"help": "report negative entropy of correct vs incorrect sampled answers"}
    )
    internal_consistency: bool = field(
        default=False,
        metadata={"help": "logit-lens internal consistency of sampled answers: its AUC and, with num_samples > 1, "
                          "IC-weighted self-consistency (SC+IC)"},
    )
    ic_mode: str = field(default="hard", metadata={"help": "internal consistency: hard, soft or candidates"})
    ic_layers: list[int] | None = field(
        default=None, metadata={"help": "internal consistency: 1-based decoder layers (null: upper half)"}
    )
    grader: Literal["answer", "code", "output_prediction"] = field(
        default="answer",
        metadata={"help": "answer: final answer vs `answer`; code: the program passes every test in `tests`; "
                          "output_prediction: predicted output of `code` vs `output` (CRUXEval-O)"},
    )
    code_timeout: float = field(default=6.0, metadata={"help": "code graders: wall seconds per test"})
    before_training: bool = field(default=True, metadata={"help": "also evaluate the starting model"})
    seed: int = field(default=1234, metadata={"help": "sampling seed"})


@dataclass
class RecipeConfig:
    """Sections every recipe has; a recipe subclasses it to add its own."""

    trainer_class: typing.ClassVar[type | None] = None  # TRL config class of the ``trainer:`` section

    model: ModelConfig = field(metadata={"help": "model to train"})
    data: DataConfig = field(metadata={"help": "training and held-out data"})
    description: str = field(default="", metadata={"help": "one line shown by `python -m recipes list`"})
    peft: LoraConfigSection | None = field(default=None, metadata={"help": "LoRA adapter (null: full fine-tune)"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "held-out evaluation"})
    trainer: Any = field(default_factory=dict, metadata={"help": "fields of the recipe's TRL config class"})
    launch: str | None = field(default=None, metadata={"help": "accelerate config the run is meant for (launch/...)"})
    vars: dict[str, Any] = field(default_factory=dict, metadata={"help": "free values for ${vars.x} interpolation"})
    source: str = field(default="", metadata={"help": "the YAML file this came from (set by the loader)"})


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
    except (OmegaConfBaseException, ValueError) as err:  # yaml syntax
        raise ConfigError(str(path), "", f"invalid YAML: {str(err).splitlines()[0]}") from None
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
        except (OmegaConfBaseException, TypeError, ValueError) as err:
            raise ConfigError(COMMAND_LINE, key, f"cannot apply override: {str(err).splitlines()[0]}") from None
        _record_origins(OmegaConf.select(cfg, key), COMMAND_LINE, origins, _key_tuple(key))
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(_origin(origins, key), key, f"cannot resolve interpolation: {str(err).splitlines()[0]}") from None
    return raw, origins


def _key_tuple(key: str) -> tuple[str, ...]:
    return tuple(p for p in key.replace("[", ".").replace("]", "").split(".") if p)


def _origin(origins: dict[tuple, str], key: str) -> str:
    parts = _key_tuple(key)
    while parts and parts not in origins:
        parts = parts[:-1]
    return origins.get(parts, origins.get((), "config"))


# --------------------------------------------------------------------------------------------
# Validation against dataclasses
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def describe(tp: Any) -> str:
    """A short human description of a type annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} section"
    return getattr(tp, "__name__", str(tp))


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
        raise ConfigError(_origin(origins, key), key, f"expected {describe(cls)}, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    out = {}
    for name, value in section.items():
        path = f"{key}.{name}" if key else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.5)
            raise ConfigError(
                _origin(origins, path), path, f"unknown key for {cls.__name__}", f"{key + '.' if key else ''}{close[0]}" if close else None
            )
        tp = hints.get(name, Any)
        inner = _dataclass_in(tp)
        if inner is not None and isinstance(value, dict):
            out[name] = check_section(value, inner, path, origins)
            continue
        coerced = coerce(value, tp)
        if coerced is _NO:
            raise ConfigError(_origin(origins, path), path, f"expected {describe(tp)}, got {value!r}")
        out[name] = coerced
    if strict_required:
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in out:
                path = f"{key}.{name}" if key else name
                raise ConfigError(_origin(origins, key), path, f"missing required key ({describe(hints.get(name, Any))})")
    return out


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls: type, values: dict) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        inner = _dataclass_in(hints.get(name, Any))
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
            raise ConfigError(_origin(origins, f"{section}.{i}.name"), f"{key}.name", str(err)) from None
        specs.append(RewardSpec(**values))
    return specs


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
                raise ConfigError(_origin(origins, key), key, str(err)) from None
        elif _looks_local(value):
            path = Path(os.path.expanduser(value))
            if not path.is_absolute():
                path = Path.cwd() / path
            if not path.exists():
                raise ConfigError(_origin(origins, key), key, f"file not found: {value}")


def load_config(schema: type[RecipeConfig], path: str | os.PathLike, overrides: list[str] = ()) -> RecipeConfig:
    """Load, merge, validate and build a recipe config (raises :class:`ConfigError`)."""
    raw, origins = load_raw(path, overrides)
    hints = _hints(schema)
    reward_lists = [f.name for f in dataclasses.fields(schema) if hints.get(f.name) == list[RewardSpec]]
    rewards_raw = {name: raw.pop(name, None) for name in reward_lists}  # `rewards` and any other list of rewards
    trainer_raw = raw.pop("trainer", None) or {}
    if isinstance(trainer_raw, dict) and isinstance(trainer_raw.get("resume_from_checkpoint"), bool):  # `true`: the last checkpoint
        trainer_raw["resume_from_checkpoint"] = str(trainer_raw["resume_from_checkpoint"]).lower()
    values = check_section(raw, schema, "", origins)
    values["source"] = str(path)
    for name, value in rewards_raw.items():
        if value is not None and not isinstance(value, list):
            raise ConfigError(_origin(origins, name), name, "expected a list of rewards")
        values[name] = validate_rewards(value, origins, name)
    cfg = _build(schema, values)
    if schema.trainer_class is not None:
        trainer_values = check_section(trainer_raw, schema.trainer_class, "trainer", origins, strict_required=False)
        cfg.trainer = build_trainer_args(schema.trainer_class, trainer_values, _origin(origins, "trainer"))
    check_paths(cfg, origins)
    return cfg


def save_config(cfg: RecipeConfig, directory: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` so the run can be repeated exactly."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "source":
            continue
        if f.name == "trainer" and hasattr(value, "to_dict"):
            value = {k: v for k, v in value.to_dict().items() if _plain(v)}
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        data[f.name] = value
    path = out / "config.yaml"
    OmegaConf.save(OmegaConf.create(data), path)
    return path


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool) or (
        isinstance(value, list | dict) and all(_plain(v) for v in (value.values() if isinstance(value, dict) else value))
    )
