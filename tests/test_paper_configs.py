"""Every paper config resolves to the values listed in docs/METHODS.md's provenance tables, and
every key it sets has a row (a value and a source).

A table follows a line ``Config: `configs/<recipe>/<file>.yaml` ...`` and has rows
``| `key.path` | `value` | source |`` (a ``|`` inside a cell is written ``\|``). Each config is
loaded through the project's own loader (``recipes.common.config.load_config`` with its recipe's schema)
and every listed key is compared with its resolved value (numbers numerically, strings exactly,
typos included, or as the YAML the cell holds). This module is the one reader of those tables;
tests/test_alol_configs.py and tests/test_decred_configs.py check particular rows through it. The
dry run of every paper config is tests/test_configs.py::test_dry_run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from recipes.common.config import load_config, load_raw
from tests.test_configs import schema_of

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "METHODS.md"
CONFIG_LINE = re.compile(r"^Config: `(configs/([^/`]+)/[^`]+\.yaml)`")
# a value cell is `text`, or `` text `` when the text holds a backtick
ROW = re.compile(r"^\| `([^`]+)` \| (?:`([^`]*)`|`` (.*?) ``) \| (.+) \|$")
# what a file says about itself, its interpolation helpers, and where a run writes: not settings
# (an evaluation config's `label` names its table row, its `output_dir` is where the report goes)
NOT_SETTINGS = {"description", "launch", "vars", "trainer.output_dir", "label", "output_dir"}

# every paper config of issue 14 and the keys its table must cover
REQUIRED = {
    "model.name_or_path", "trainer.learning_rate", "trainer.beta", "trainer.num_generations",
    "trainer.per_device_train_batch_size", "trainer.gradient_accumulation_steps", "trainer.temperature",
    "trainer.max_completion_length", "trainer.loss_type", "trainer.scale_rewards",
    "trainer.vllm_importance_sampling_correction", "trainer.use_bias_correction_kl", "rewards.0.name",
}
PAPER_CONFIGS = {
    "configs/intuitor/qwen2.5-1.5b_math.yaml", "configs/intuitor/qwen2.5-3b_math.yaml",
    "configs/intuitor/qwen2.5-7b_math.yaml", "configs/intuitor/qwen2.5-14b_math.yaml",
    "configs/intuitor/qwen2.5-3b_codeforces.yaml", "configs/rlif/qwen2.5-math-7b_aime24_ttrl.yaml",
    "configs/rlif/qwen2.5-7b-instruct_aime24_rent.yaml",
}
# keys the loader adapts to the machine (mixed precision is turned off without a GPU): compared as written
AS_WRITTEN = {"trainer.bf16", "trainer.fp16"}
INTUITOR_KEYS = {"trainer.seed", "trainer.top_k", "data.system_prompt", "trainer.warmup_steps"}


def provenance_tables(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """``config path -> [(key, value, source), ...]`` from the markdown."""
    tables: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        match = CONFIG_LINE.match(line)
        if match:
            current = match.group(1)
            assert current not in tables, f"two provenance tables for {current}"
            tables[current] = []
            continue
        row = ROW.match(line)
        if row and current is not None:
            key, plain, ticked, source = row.groups()
            value = plain if plain is not None else ticked
            tables[current].append(tuple(cell.replace("\\|", "|") for cell in (key, value, source)))
        elif current is not None and tables[current] and not line.startswith("|"):
            current = None  # the table ended
    return tables


TABLES = provenance_tables(METHODS.read_text())


def rows(path: str) -> dict[str, tuple[object, str]]:
    """``key -> (value, source)`` of one config's table, the value read as YAML."""
    return {key: (yaml.safe_load(value), source) for key, value, source in TABLES[path]}


def load_as_written(path: str):
    """A paper config through the project's loader, as on the machine it was written for: its
    ``model.quantization`` (QLoRA) is refused here without a GPU (tests/test_bad_input.py checks
    that), which is right for a run and wrong for reading the file."""
    import recipes.common.checks as config

    recipe = CONFIG_LINE.match(f"Config: `{path}`").group(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "check_model_options", lambda cfg, origins: None)
        mp.delenv("INTRINSIC_DATA", raising=False)  # local fallbacks as the tables list them: under data/
        return load_config(schema_of(recipe), ROOT / path)


def leaves(node, prefix: str = ""):
    """Dotted keys of every setting in a raw config; a mapping whose keys are not names (text
    substitutions) and a list of plain values are one setting each."""
    if isinstance(node, dict) and node and all(isinstance(k, str) and k.isidentifier() for k in node):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def resolve(cfg, key: str):
    value = cfg
    for part in key.split("."):
        if isinstance(value, list | tuple):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value[part]
        else:
            value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.value if hasattr(value, "value") and not isinstance(value, str | int | float) else value


def matches(resolved, listed: str) -> bool:
    if isinstance(resolved, bool):
        return listed == str(resolved).lower()
    if resolved is None:
        return listed == "null"
    if isinstance(resolved, int | float):
        return float(listed) == pytest.approx(float(resolved), rel=1e-12, abs=0)
    if isinstance(resolved, str):  # the string itself, or its YAML (quoted, with escapes)
        return listed == resolved or yaml.safe_load(listed) == resolved
    return yaml.safe_load(listed) == resolved


def test_parser_reads_a_table():
    text = "Config: `configs/rlif/x.yaml` (x)\n\n| key | value | source |\n|---|---|---|\n" \
           "| `trainer.beta` | `0.01` | `a.yaml` |\n| `data.system_prompt` | `a \\boxed{b}` | c |\n\nprose\n"
    assert provenance_tables(text) == {"configs/rlif/x.yaml": [("trainer.beta", "0.01", "`a.yaml`"),
                                                            ("data.system_prompt", "a \\boxed{b}", "c")]}


def test_every_paper_config_has_a_table():
    assert PAPER_CONFIGS <= set(TABLES), sorted(PAPER_CONFIGS - set(TABLES))
    for path, rows in TABLES.items():
        keys = [key for key, _, _ in rows]
        assert len(keys) == len(set(keys)), f"{path}: a key listed twice"
        assert all(source.strip() for _, _, source in rows), f"{path}: a row without a source"
        if path in PAPER_CONFIGS:
            assert REQUIRED <= set(keys), f"{path}: missing {sorted(REQUIRED - set(keys))}"
        if path.startswith("configs/intuitor/"):
            assert INTUITOR_KEYS <= set(keys), f"{path}: missing {sorted(INTUITOR_KEYS - set(keys))}"


@pytest.mark.parametrize("path", sorted(TABLES))
def test_config_resolves_to_the_listed_values(path):
    cfg = load_as_written(path)
    raw = load_raw(ROOT / path)[0]
    wrong = []
    for key, listed, _ in TABLES[path]:
        try:
            resolved = resolve(raw if key in AS_WRITTEN else cfg, key)
        except (AttributeError, KeyError, IndexError) as err:
            wrong.append(f"{key}: not in the resolved config ({err})")
            continue
        if not matches(resolved, listed):
            wrong.append(f"{key}: config {resolved!r}, METHODS.md {listed!r}")
    assert not wrong, f"{path}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(TABLES))
def test_every_key_of_the_config_has_a_row(path):
    settings = {key for key, _ in leaves(load_raw(ROOT / path)[0])}
    settings = {key for key in settings if key not in NOT_SETTINGS and key.split(".")[0] not in NOT_SETTINGS}
    listed = {key for key, _, _ in TABLES[path]}
    assert not settings - listed, f"{path}: keys without a provenance row: {sorted(settings - listed)}"
    # a row may also state a default the file leaves in force; test_config_resolves_to_the_listed_values checks it
