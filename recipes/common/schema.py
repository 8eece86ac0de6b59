"""What a user can set: the config sections every recipe shares, with help text and defaults.

A recipe's schema is a :class:`RecipeConfig` subclass; its fields are the YAML's top-level
sections (``model:``, ``data:``, ``eval:``, ``peft:``, ``trainer:``, ...) and each section is a
dataclass whose fields carry ``metadata={"help": ...}``. ``trainer:`` takes the fields of the
recipe's TRL config class (``trainer_class``). :func:`schema_help` renders all of it for
``python -m recipes.<name> --help``. Loading and checking are in :mod:`recipes.common.config` and
:mod:`recipes.common.checks`.
"""

from __future__ import annotations

import dataclasses
import enum
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


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
class ChoicesSection:
    """Multiple-choice rows whose options sit in columns of their own, the correct one in a fixed column
    (GPQA's ``Correct Answer``): the options are shuffled into columns ``A``, ``B``, ... (for the prompt's
    ``{A}``, ``{B}``, ...) and the gold letter becomes the ``answer`` column."""

    correct: str = field(metadata={"help": "the dataset's column holding the correct option"})
    incorrect: list[str] = field(metadata={"help": "the dataset's columns holding the wrong options"})
    seed: int = field(
        default=0, metadata={"help": "shuffle seed: row i's options are ordered by random.Random(f'{seed}:{i}')"}
    )


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
    choices: ChoicesSection | None = field(
        default=None, metadata={"help": "multiple choice: options shuffled per row into columns A, B, ...; "
                                        "the gold letter becomes `answer` (null: none)"},
    )


@dataclass
class RewardSpec:
    """One reward: registered name or dotted path, weight, constructor keyword arguments."""

    name: str = field(metadata={"help": "registered reward name or dotted path to a class"})
    weight: float = field(default=1.0, metadata={"help": "weight in the total reward (0: logged only)"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of the reward class"})
    transform: dict[str, Any] | Literal["rank"] | None = field(
        default=None,
        metadata={"help": "reshape the reward's values before the weighted sum and the group normalisation: "
                          "{clip: [lo, hi], scale: s, shift: b} (IRRL's clipped linear form, min(max(s r + b, lo), hi)) "
                          "or rank (rank within the group, scaled to [0, 1]); null: as is"},
    )


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
    perplexity_consistency: bool = field(
        default=False,
        metadata={"help": "RPC's perplexity consistency of sampled answers (normalized, no pruning; needs "
                          "num_samples > 1): its AUC and the PC-selected answer's accuracy (pc_vote_accuracy)"},
    )
    ic_mode: str = field(default="hard", metadata={"help": "internal consistency: hard, soft, candidates, calibrated or calibrated_choices"})
    ic_layers: list[int] | None = field(
        default=None, metadata={"help": "internal consistency: 1-based decoder layers (null: upper half)"}
    )
    clue: bool = field(
        default=False,
        metadata={"help": "CLUE's hidden-state-delta score of sampled answers (centroids fit on the gold labels of "
                          "the other half of the prompts): its AUC and the accuracy of its top-scored sample"},
    )
    grader: Literal["answer", "code", "output_prediction", "choice"] = field(
        default="answer",
        metadata={"help": "answer: final answer vs `answer`; code: the program passes every test in `tests`; "
                          "output_prediction: predicted output of `code` vs `output` (CRUXEval-O); "
                          "choice: the option letter chosen vs the letter in `answer` (GPQA)"},
    )
    code_timeout: float = field(default=6.0, metadata={"help": "code graders: wall seconds per test"})
    backend: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "generation: hf (transformers generate) or vllm (vllm.LLM, needs the vllm extra)"}
    )
    before_training: bool = field(default=True, metadata={"help": "also evaluate the starting model"})
    seed: int = field(default=1234, metadata={"help": "sampling seed"})
    every_steps: int | None = field(
        default=None,
        metadata={"help": "also evaluate every N optimizer steps during training, logged as eval_* metrics "
                          "(TensorBoard/W&B: eval/...); null: only before and after training"},
    )
    every_rows: int | None = field(
        default=None,
        metadata={"help": "held-out rows evaluated during training: the first N (null: all eval.max_rows)"},
    )


@dataclass
class RecipeConfig:
    """Sections every recipe has; a recipe subclasses it to add its own."""

    trainer_class: typing.ClassVar[type | None] = None  # TRL config class of the ``trainer:`` section
    evaluates_during_training: typing.ClassVar[bool] = False  # the recipe honours ``eval.every_steps``

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
# Types in words, and the help text of a schema
# --------------------------------------------------------------------------------------------


def type_hints(cls: type) -> dict[str, Any]:
    """Field name -> type annotation of dataclass ``cls`` (``from __future__`` strings resolved)."""
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


def dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X``, ``X | None`` or ``list[X]``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _shown(value: Any) -> str:
    """A default as YAML writes it: ``null``, ``true``, ``'nf4'``, ``[]``."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value.value if isinstance(value, enum.Enum) else value)


def field_default(f: dataclasses.Field) -> Any:
    """The value field ``f`` takes when a config leaves it out (its ``default_factory`` called), or
    ``dataclasses.MISSING`` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default(f: dataclasses.Field) -> str | None:
    """``default: x``, ``required``, or ``None`` for a section whose keys are listed one by one."""
    value = field_default(f)
    if value is dataclasses.MISSING:
        return "required"
    return None if dataclasses.is_dataclass(value) else f"default: {_shown(value)}"


def _entry(key: str, text: str, indent: int, width: int = 100) -> list[str]:
    """``key`` in a column, ``text`` wrapped beside it (or below it, if the key is long)."""
    column, head = indent + 26, " " * indent + key
    if len(head) >= column - 1:
        return [head] + textwrap.wrap(text, width, initial_indent=" " * column, subsequent_indent=" " * column)
    return textwrap.wrap(text, width, initial_indent=head.ljust(column), subsequent_indent=" " * column) or [head]


def section_help(cls: type, indent: int = 2, skip: tuple[str, ...] = ()) -> list[str]:
    """One entry per field of dataclass ``cls`` (but ``skip``): its help, type and default; a nested
    section's keys below it. At ``indent`` 0 the fields are the top-level sections (``model:``)."""
    hints, lines = type_hints(cls), []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        tp, help_text = hints.get(f.name, Any), f.metadata.get("help", "")
        notes = "; ".join(n for n in (describe(tp), _default(f)) if n)
        key = f"{f.name}:" if indent == 0 else f.name
        lines += _entry(key, f"{help_text} [{notes}]" if help_text else f"[{notes}]", indent)
        inner = dataclass_in(tp)
        if inner is not None:
            lines += section_help(inner, indent + 2)
    return lines


def trainer_help(trainer_class: type, indent: int = 2) -> list[str]:
    """The fields of a TRL config class: default and the first sentence of TRL's help for each."""
    lines = []
    for f in dataclasses.fields(trainer_class):
        if not f.init or f.name.startswith("_"):
            continue
        first = " ".join((f.metadata.get("help") or "").split()).split(". ")[0].rstrip(".")
        default = _default(f) or f"default: a {type(f.default_factory()).__name__}"
        lines += _entry(f.name, f"{first} [{default}]", indent)
    return lines


def schema_help(schema: type[RecipeConfig]) -> str:
    """The config sections of a recipe for ``--help``: every key with its help, type and default
    (as TRL's ``HfArgumentParser`` lists fields), then the ``trainer:`` section's TRL fields."""
    lines = ["config sections (YAML keys; on the command line: section.key=value):", ""]
    lines += section_help(schema, indent=0, skip=("trainer",))
    trainer = schema.trainer_class
    if trainer is None:
        lines += ["", "trainer: none (this recipe trains nothing)"]
    else:
        trl = next((c for c in trainer.__mro__ if c.__module__.startswith("trl.")), trainer)
        what = f"{trainer.__module__}.{trainer.__name__}" + (f", a {trl.__name__}" if trl is not trainer else "")
        lines += ["", *textwrap.wrap(f"trainer: any field of TRL's config class for this recipe ({what}); each "
                                     "with its default and the first sentence of its help:", 100)]
        lines += trainer_help(trainer)
    return "\n".join(lines)
