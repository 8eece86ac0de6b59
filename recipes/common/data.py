"""Datasets: Hub names, local directories and files, ``tiny://`` tasks; column mapping; prompts.

Every dataset is normalised to our column names: ``question`` (the problem), ``answer`` (gold,
optional), ``completion`` (a target response, optional) — mapped from the dataset's own names
by ``data.columns`` — and gains a ``prompt`` column built from the prompt template (a string,
or chat messages when ``data.system_prompt`` is set or ``data.conversational`` is true).
"""

from __future__ import annotations

import difflib
import logging
import os
import random
from dataclasses import replace
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .errors import ConfigError
from .schema import ChoicesSection, DataConfig
from .tiny import is_tiny, resolve_tiny_dataset

# Named prompt templates; an inline template is any string containing "{question}".
PROMPTS = {
    "plain": "{question}",
    "math_boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "math_boxed_stop": (
        "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}. "
        "Stop right after the box."
    ),
}
COLUMNS = ("question", "answer", "completion")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
logger = logging.getLogger("intrinsic")


def prompt_template(name_or_template: str) -> str:
    if name_or_template in PROMPTS:
        return PROMPTS[name_or_template]
    if "{question}" in name_or_template:
        return name_or_template
    close = difflib.get_close_matches(name_or_template, PROMPTS, n=1)
    raise KeyError(
        f"unknown prompt template {name_or_template!r} (named: {sorted(PROMPTS)}"
        + (f"; closest: {close[0]!r}" if close else "")
        + "; an inline template must contain {question})"
    )


def _load_split(cfg: DataConfig, split: str) -> Dataset:
    path = cfg.path
    if is_tiny(path):
        return resolve_tiny_dataset(path, split)
    local = Path(os.path.expanduser(path))
    if local.is_file():
        builder = FILE_TYPES.get(local.suffix)
        if builder is None:
            raise ValueError(f"{path}: unsupported file type (use {sorted(FILE_TYPES)})")
        data = load_dataset(builder, data_files={split: str(local)})
        return data[split]
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        data = load_from_disk(str(local))
        return data[split] if isinstance(data, DatasetDict) else data
    try:
        return load_dataset(path, cfg.name, split=split, revision=cfg.revision, data_dir=cfg.data_dir)
    except Exception as err:  # offline, unknown name, no access: the configured local copy, if any
        if not cfg.fallback:
            raise
        logger.warning("data: cannot load %s from the Hub (%s); reading the fallback %s",
                       path, str(err).splitlines()[0] if str(err) else type(err).__name__, cfg.fallback)
        return _load_split(replace(cfg, path=cfg.fallback, fallback=None), split)


def _innermost(err: BaseException) -> str:
    """The first line of the deepest cause's message (datasets wraps the parser's error)."""
    while err.__cause__ is not None or (err.__context__ is not None and not str(err)):
        err = err.__cause__ or err.__context__
    return (str(err).splitlines() or [""])[0] or type(err).__name__


def read_split(cfg: DataConfig, split: str, source: str = "config") -> Dataset:
    """:func:`_load_split`, a local file that cannot be read (empty, truncated, not its type's
    format) or an unsupported file being a :class:`ConfigError` naming the file."""
    local = not is_tiny(cfg.path) and Path(os.path.expanduser(cfg.path)).is_file()
    if local and Path(os.path.expanduser(cfg.path)).stat().st_size == 0:
        raise ConfigError(source, "data.path", f"{cfg.path} is empty")
    try:
        return _load_split(cfg, split)
    except ConfigError:
        raise
    except Exception as err:
        if not local:
            raise
        raise ConfigError(source, "data.path", f"cannot read {cfg.path}: {_innermost(err)}") from None


def load_rows(cfg: DataConfig, split: str, max_rows: int | None = None, source: str = "config") -> Dataset:
    """One split as stored (no column mapping, no prompt), at most ``max_rows`` rows; non-empty."""
    data = read_split(cfg, split, source)
    if max_rows is not None:
        data = data.select(range(min(max_rows, len(data))))
    if len(data) == 0:
        raise ConfigError(source, "data.path", f"split {split!r} of {cfg.path} is empty")
    return data


def load_split(cfg: DataConfig, split: str, max_rows: int | None = None, source: str = "config") -> Dataset:
    """One split, with our column names and a ``prompt`` column (raises :class:`ConfigError`)."""
    data = read_split(cfg, split, source)
    if cfg.choices is not None:
        data = shuffle_choices(data, cfg.choices, source)
    for ours, theirs in cfg.columns.items():
        if ours not in COLUMNS:
            close = difflib.get_close_matches(ours, COLUMNS, n=1)
            raise ConfigError(source, f"data.columns.{ours}", f"unknown column role (roles: {list(COLUMNS)})",
                              f"data.columns.{close[0]}" if close else None)
        if theirs not in data.column_names:
            close = difflib.get_close_matches(theirs, data.column_names, n=1)
            raise ConfigError(source, f"data.columns.{ours}",
                              f"column {theirs!r} not in dataset {cfg.path} (columns: {data.column_names})",
                              close[0] if close else None)
    rename, copies = {}, {}  # one dataset column may serve two roles (MATH's solution: answer and completion)
    for ours, theirs in cfg.columns.items():
        if theirs == ours:
            continue
        if theirs in rename or cfg.columns.get(theirs) == theirs:
            copies[ours] = rename.get(theirs, theirs)
        else:
            rename[theirs] = ours
    clash = [ours for ours in [*rename.values(), *copies] if ours in data.column_names]
    data = data.remove_columns(clash).rename_columns(rename)
    for ours, source in copies.items():
        data = data.add_column(ours, data[source])
    if "question" not in data.column_names:
        close = difflib.get_close_matches("question", data.column_names, n=1, cutoff=0.75)
        raise ConfigError(source, "data.columns.question",
                          f"dataset {cfg.path} has no 'question' column (columns: {data.column_names}); map one",
                          close[0] if close else None)
    check_text_column(data, "question", source)
    if cfg.split_on:
        data = data.map(lambda row: _split_on(row["question"], cfg.split_on, source))
    if max_rows is not None:
        data = data.select(range(min(max_rows, len(data))))
    if len(data) == 0:
        raise ConfigError(source, "data.path", f"split {split!r} of {cfg.path} is empty")
    template = prompt_template(cfg.prompt)
    chat = cfg.conversational or cfg.system_prompt is not None

    def make_prompt(row):
        text = template.format_map(row)  # {question}, and any other column ({input} of CRUXEval)
        if not chat:
            return {"prompt": text}
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        return {"prompt": [*messages, {"role": "user", "content": text}]}

    return data.map(make_prompt)


def choice_order(seed: int, index: int, n: int) -> list[int]:
    """Row ``index``'s option order: position ``k`` shows option ``order[k]`` (0: the correct one),
    ``random.Random(f"{seed}:{index}")`` shuffling ``0..n-1`` (string seeds hash with SHA-512: the
    same order on every machine and Python version).

    >>> choice_order(0, 0, 4) == choice_order(0, 0, 4), sorted(choice_order(0, 5, 4))
    (True, [0, 1, 2, 3])
    """
    order = list(range(n))
    random.Random(f"{seed}:{index}").shuffle(order)
    return order


def shuffle_choices(data: Dataset, choices: ChoicesSection, source: str = "config") -> Dataset:
    """``data.choices``: each row's options (the ``correct`` column's first, then ``incorrect``'s),
    stripped of surrounding whitespace, in the order :func:`choice_order` gives row ``i`` of the
    split as stored, as columns ``A``, ``B``, ...; ``answer`` is the letter of the correct one."""
    from rewards.choice import option_letters

    options = [choices.correct, *choices.incorrect]
    for i, column in enumerate(options):
        if column not in data.column_names:
            key = "data.choices.correct" if i == 0 else f"data.choices.incorrect[{i - 1}]"
            close = difflib.get_close_matches(column, data.column_names, n=1)
            raise ConfigError(source, key, f"column {column!r} not in the dataset (columns: {data.column_names})",
                              close[0] if close else None)
    letters = option_letters(len(options))

    def shuffle(row: dict, index: int) -> dict:
        order = choice_order(choices.seed, index, len(options))
        shown = {letter: str(row[options[k]]).strip() for letter, k in zip(letters, order)}
        return {**shown, "answer": letters[order.index(0)]}

    return data.map(shuffle, with_indices=True)


def check_text_column(data: Dataset, column: str, source: str) -> None:
    """``column`` holds text (or chat messages): a number or a mapping would become a prompt silently."""
    feature = data.features.get(column)
    dtype = getattr(feature, "dtype", None)
    if dtype is not None and dtype not in ("string", "large_string"):
        raise ConfigError(source, f"data.columns.{column}", f"column {column!r} holds {dtype}, not text "
                                                            f"(first row: {data[0][column]!r})")
    if isinstance(feature, dict):  # a struct: mappings per row
        raise ConfigError(source, f"data.columns.{column}", f"column {column!r} holds mappings, not text "
                                                            f"(first row: {data[0][column]!r})")


def _split_on(text: str, marker: str, source: str) -> dict:
    """``data.split_on``: question = text up to and including the last ``marker``, completion = the rest."""
    at = text.rfind(marker)
    if at < 0:
        raise ConfigError(source, "data.split_on", f"marker {marker!r} not found in a row: {text[:80]!r}")
    return {"question": text[: at + len(marker)], "completion": text[at + len(marker) :]}


def to_sft_format(data: Dataset, keep: list[str] | tuple[str, ...] = ()) -> Dataset:
    """Prompt-completion rows for TRL's SFTTrainer (completion as an assistant turn if chat), plus
    the ``keep`` columns (e.g. what a reward reads)."""
    if "completion" not in data.column_names:
        raise ValueError("supervised training needs a 'completion' column (map one in data.columns)")
    if isinstance(data[0]["prompt"], list):
        data = data.map(lambda row: {"completion": [{"role": "assistant", "content": row["completion"]}]})
    return data.select_columns(["prompt", "completion", *[c for c in keep if c in data.column_names]])
