"""Data loading from local files and directories (the Hub path's local twin), mapping, prompts."""

import json

import pytest
from datasets import Dataset, DatasetDict

from recipes.common.data import load_split, prompt_template, to_sft_format
from recipes.common.errors import ConfigError
from recipes.common.schema import DataConfig

ROWS = [{"problem": f"{i}+1=", "solution": f"\\boxed{{{i + 1}}}", "extra": i} for i in range(5)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.parquet", "saved"])
def test_local_sources_with_column_mapping(files, name):
    cfg = DataConfig(path=str(files / name), columns={"question": "problem", "answer": "solution"})
    data = load_split(cfg, "train")
    assert len(data) == 5
    assert data[2]["question"] == "2+1=" and data[2]["prompt"] == "2+1=" and data[2]["answer"] == "\\boxed{3}"
    assert "extra" in data.column_names  # other columns ride along (TRL passes them to rewards)


def test_saved_dataset_dict_split(files):
    assert len(load_split(DataConfig(path=str(files / "saved"), columns={"question": "problem"}), "test")) == 2


def test_named_inline_and_chat_prompts(files):
    cfg = DataConfig(path=str(files / "rows.jsonl"), columns={"question": "problem"}, prompt="math_boxed")
    assert load_split(cfg, "train")[0]["prompt"].startswith("0+1=\nPlease reason step by step")
    cfg = DataConfig(path=str(files / "rows.jsonl"), columns={"question": "problem"}, prompt="Q: {question} A:",
                     system_prompt="Be brief.")
    assert load_split(cfg, "train", max_rows=2)[1]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1= A:"},
    ]
    with pytest.raises(KeyError, match="closest: 'math_boxed'"):
        prompt_template("math_boxd")


def test_missing_and_unknown_columns(files):
    with pytest.raises(ConfigError, match="has no 'question' column") as err:
        load_split(DataConfig(path=str(files / "rows.jsonl")), "train", source="x.yaml")
    assert err.value.source == "x.yaml" and err.value.suggestion is None
    with pytest.raises(ConfigError, match="unknown column role") as err:
        load_split(DataConfig(path=str(files / "rows.jsonl"), columns={"questoin": "problem"}), "train")
    assert err.value.suggestion == "data.columns.question"


def test_sft_format_needs_completion(files):
    data = load_split(DataConfig(path="tiny://arithmetic?n_train=4"), "train")
    assert to_sft_format(data)[0] == {"prompt": data[0]["question"], "completion": data[0]["answer"]}
    with pytest.raises(ValueError, match="'completion' column"):
        to_sft_format(load_split(DataConfig(path=str(files / "rows.jsonl"), columns={"question": "problem"}), "train"))
