"""configs/alol/llama-7b_hh.yaml equals the provenance table of docs/METHODS.md §7, key by key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from recipes.alol import ALoLRecipeConfig
from recipes.config import load_config, load_raw

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/alol/llama-7b_hh.yaml"
NOT_SETTINGS = ("description", "launch", "vars")  # what the file says about itself, and its interpolation helpers
MACHINE_DEPENDENT = {"trainer.bf16"}


def load_hh(*overrides: str) -> ALoLRecipeConfig:
    """The HH config as written: here, without a GPU, its ``model.quantization`` (QLoRA) would be
    refused (tests/test_bad_input.py checks that), which is right for a run but not for reading it."""
    import recipes.config as config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "check_model_options", lambda cfg, origins: None)
        return load_config(ALoLRecipeConfig, CONFIG, list(overrides))


def provenance_table(section: str = "## 7. A-LoL") -> dict[str, tuple[object, str]]:
    """``key -> (value, source)`` from the ``| key | value | source |`` table of a METHODS.md section;
    values are the YAML in the cell's code span."""
    text = (ROOT / "docs" / "METHODS.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    rows, inside = {}, False
    for line in body.splitlines():
        if re.match(r"^\|\s*key\s*\|\s*value\s*\|\s*source\s*\|$", line.strip()):
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:4]  # a "|" inside a cell is written "\\|"
            key, value, source = (cell.strip().replace("\\|", "|") for cell in cells)
            assert key.startswith("`") and value.startswith("`"), line
            rows[key.strip("`")] = (yaml.safe_load(value[1:-1]), source)
        elif inside:
            break
    return rows


def leaves(node, prefix: str = ""):
    """Dotted keys of every setting in a raw config; a mapping whose keys are not names (text
    substitutions) and every list is one setting."""
    if isinstance(node, dict) and node and all(isinstance(k, str) and k.isidentifier() for k in node):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def resolved(cfg, key: str):
    value = cfg
    for part in key.split("."):
        if isinstance(value, dict):
            value = value[part]
        elif isinstance(value, list):
            value = value[int(part)]
        else:
            value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def test_table_parses_with_sources():
    table = provenance_table()
    assert len(table) > 50
    for key, (_, source) in table.items():
        assert source, f"{key}: no source"


def test_hh_config_equals_its_provenance_table():
    table = provenance_table()
    cfg = load_hh()
    raw, _ = load_raw(CONFIG)
    keys = {k for k, _ in leaves(raw) if k.split(".")[0] not in NOT_SETTINGS}
    assert keys - set(table) == set(), f"keys of {CONFIG} without a provenance row"
    assert set(table) - keys == set(), f"provenance rows for keys {CONFIG} does not set"
    settings = dict(leaves(raw))
    for key, (value, _) in table.items():
        # bf16 is switched off by the loader on a machine without a GPU: there the file's value is compared
        got = settings[key] if key in MACHINE_DEPENDENT else resolved(cfg, key)
        if hasattr(got, "value"):  # enums (SchedulerType, SaveStrategy, ...)
            got = got.value
        if isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


def test_table_rows_are_the_references_where_it_says_so():
    """The layout, stop rule and value-head rows name LoL-RL's script or its utils, not the project."""
    table = provenance_table()
    for key in ("trainer.prompt_preamble", "trainer.prompt_replace", "trainer.stop_strings", "trainer.response_cut",
                "trainer.max_prompt_length", "trainer.max_completion_length", "trainer.baseline_priority_sampling",
                "trainer.value_select", "trainer.value_val_fraction", "trainer.value_epochs"):
        assert table[key][1].startswith("`lolrl…`"), key
    for key in ("trainer.value_head", "trainer.value_num_heads", "trainer.value_dropout"):
        assert "utils/rl_utils.py" in table[key][1], key
