"""Every paper config resolves to the authors' values listed in docs/METHODS.md's provenance tables.

A table follows a line ``Config: `configs/<recipe>/<file>.yaml` ...`` and has rows
``| `key.path` | `value` | source |``. Each config is loaded through the project's own loader
(``recipes.config.load_config`` with its recipe's schema) and every listed key is compared with
its resolved value (numbers numerically, strings exactly, typos included). The dry run of every
paper config is tests/test_configs.py::test_dry_run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from recipes.config import load_config, load_raw
from tests.test_configs import schema_of

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "METHODS.md"
CONFIG_LINE = re.compile(r"^Config: `(configs/([^/`]+)/[^`]+\.yaml)`")
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \| (.+) \|$")

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
            tables[current].append(row.groups())
        elif current is not None and tables[current] and not line.startswith("|"):
            current = None  # the table ended
    return tables


TABLES = provenance_tables(METHODS.read_text())


def resolve(cfg, key: str):
    value = cfg
    for part in key.split("."):
        if isinstance(value, list | tuple):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value[part]
        else:
            value = getattr(value, part)
    return value.value if hasattr(value, "value") and not isinstance(value, str | int | float) else value


def matches(resolved, listed: str) -> bool:
    if isinstance(resolved, bool):
        return listed == str(resolved).lower()
    if resolved is None:
        return listed == "null"
    if isinstance(resolved, int | float):
        return float(listed) == pytest.approx(float(resolved), rel=1e-12, abs=0)
    if isinstance(resolved, str):
        return listed == resolved
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
    recipe = CONFIG_LINE.match(f"Config: `{path}`").group(2)
    cfg = load_config(schema_of(recipe), ROOT / path)
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
