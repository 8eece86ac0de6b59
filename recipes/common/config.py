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

import yaml
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
    ic_mode: str = field(default="hard", metadata={"help": "internal consistency: hard, soft, candidates, calibrated or calibrated_choices"})
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
        check_local_path(key, value, _origin(origins, key))


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
    try:
        cfg = _build(schema, values)
    except (TypeError, ValueError) as err:  # a section's own __post_init__ check (e.g. decred.layers)
        raise ConfigError(str(path), _section_named(err, values), str(err).splitlines()[0]) from None
    if schema.trainer_class is not None:
        trainer_values = check_section(trainer_raw, schema.trainer_class, "trainer", origins, strict_required=False)
        cfg.trainer = build_trainer_args(schema.trainer_class, trainer_values, _origin(origins, "trainer"))
    check_paths(cfg, origins)
    check_values(cfg, origins)
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


# --------------------------------------------------------------------------------------------
# Values the types cannot check: ranges, the model's depth, what this machine can do
# --------------------------------------------------------------------------------------------


def _section_named(err: Exception, values: dict) -> str:
    """The key a section's own check names first in its message (``decred.layers must ...``), or ''."""
    word = (str(err).split() or [""])[0].rstrip(":,")
    return word if word.split(".")[0] in values else ""


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
        raise ConfigError(_origin(origins, key), key, f"must be {expected}, got {value!r}")


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
    modes = [m[3:] for m in LENS_SIGNALS]
    if ev.ic_mode not in modes:
        close = difflib.get_close_matches(ev.ic_mode, modes, n=1)
        raise ConfigError(_origin(origins, f"{key}.ic_mode"), f"{key}.ic_mode", f"expected one of {modes}, got {ev.ic_mode!r}",
                          close[0] if close else None)


def check_model_options(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """``model.quantization`` / ``model.adapter`` / ``peft``: refused where nothing could honour them
    (no GPU for 4-bit loading; 4-bit weights with nothing trainable on top; a LoRA on a LoRA)."""
    from trainers.distributed import no_accelerator

    trains = type(cfg).trainer_class is not None
    if cfg.model.quantization is not None:
        key = "model.quantization"
        if no_accelerator():
            raise ConfigError(_origin(origins, key), key, "4-bit loading (bitsandbytes, QLoRA) needs a CUDA GPU and there "
                                                          "is none here; set model.quantization=null (or use --dry-run)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(_origin(origins, key), key, "4-bit loading needs bitsandbytes: pip install bitsandbytes") from None
        if trains and cfg.peft is None and not cfg.model.adapter:
            raise ConfigError(_origin(origins, key), key, "4-bit weights cannot be trained: add a peft: section (QLoRA) "
                                                          "or a model.adapter to train on top of them")
    if cfg.peft is not None and cfg.model.adapter:
        raise ConfigError(_origin(origins, "peft"), "peft", "model.adapter is trained further as it is; a second LoRA "
                                                            "(peft) on top of it is not supported: set peft=null")
    if cfg.peft is not None and not trains:
        raise ConfigError(_origin(origins, "peft"), "peft", "this recipe trains nothing: a LoRA (peft) section would be "
                                                            "ignored; remove it (model.adapter evaluates an adapter)")
    if cfg.model.adapter:
        path = Path(os.path.expanduser(cfg.model.adapter))
        if (path.exists() or _looks_local(cfg.model.adapter)) and not (path / "adapter_config.json").is_file():
            raise ConfigError(_origin(origins, "model.adapter"), "model.adapter",
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
    from rewards import InternalConsistency

    out = []
    if cfg.eval.internal_consistency and cfg.eval.ic_layers:
        out.append(("eval.ic_layers", list(cfg.eval.ic_layers), 1))
    for f in dataclasses.fields(cfg):
        specs = getattr(cfg, f.name)
        if not (isinstance(specs, list) and specs and all(isinstance(s, RewardSpec) for s in specs)):
            continue
        for i, spec in enumerate(specs):
            layers = spec.kwargs.get("layers")
            if isinstance(layers, list) and issubclass(get_reward_class(spec.name), InternalConsistency):
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
            raise ConfigError(_origin(origins, key), key, f"layers {bad} outside 1..{depth}: {cfg.model.name_or_path} "
                                                          f"has {depth} decoder layers")
    for name, section in sections:
        try:
            section.check_depth(depth)
        except ValueError as err:
            key = _section_named(err, {name: None}) or name
            raise ConfigError(_origin(origins, key), key, str(err).splitlines()[0]) from None


def check_data_values(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    from .data import prompt_template

    for name in ("data",) + tuple(f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), DataConfig)
                                  and f.name != "data"):
        data = getattr(cfg, name)
        _check_range(origins, f"{name}.max_rows", data.max_rows, lambda v: v >= 1, ">= 1 or null")
        try:
            prompt_template(data.prompt)
        except KeyError as err:
            raise ConfigError(_origin(origins, f"{name}.prompt"), f"{name}.prompt", err.args[0]) from None


def check_values(cfg: RecipeConfig, origins: dict[tuple, str]) -> None:
    """Every value check that needs no model weights and no data rows (run by :func:`load_config`)."""
    if type(cfg).trainer_class is not None and not isinstance(cfg.trainer, dict):
        check_trainer_values(cfg.trainer, origins)
    check_eval_values(cfg.eval, origins)
    check_data_values(cfg, origins)
    check_model_options(cfg, origins)
    check_depth(cfg, origins)
