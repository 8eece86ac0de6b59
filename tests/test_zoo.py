"""The label-free zoo (recipes.zoo): mean ± spread against explicit numbers, cells cached by config
digest (only missing or changed cells are computed), a missing method config skipped with a logged
line, bad input in one line, and one very small end-to-end run (2 methods x 1 seed x 1 step)."""

from __future__ import annotations

import json
import logging
import math

import pytest
from omegaconf import OmegaConf

from recipes import zoo
from recipes.common.zoo_table import aggregate, format_markdown, mean_spread

MODEL = "tiny://qwen2?layers=2&hidden=64&intermediate=256"
DATA = "tiny://arithmetic?ops=add&digits=2&n_train=200&n_test=16"


def _cell(method, seed, **report):
    return {"method": method, "label": method.upper(), "seed": seed, "report": {"rows": 10, **report}, "history": []}


def test_mean_and_sample_std_over_seeds():
    cells = [_cell("base", s, greedy_accuracy=0.7) for s in range(3)]
    cells += [_cell("a", 0, greedy_accuracy=0.8, sc_auc=0.5), _cell("a", 1, greedy_accuracy=0.9, sc_auc=0.6),
              _cell("a", 2, greedy_accuracy=1.0, sc_auc=0.9), _cell("b", 0, greedy_accuracy=0.25)]
    table = aggregate(cells)
    assert list(table) == ["base", "a", "b"] and table["a"]["seeds"] == [0, 1, 2]
    greedy = table["a"]["metrics"]["greedy_accuracy"]
    assert greedy["n"] == 3 and greedy["mean"] == pytest.approx(0.9)
    assert greedy["std"] == pytest.approx(0.1)                          # sqrt((0.01 + 0 + 0.01) / 2)
    sc = table["a"]["metrics"]["sc_auc"]
    deviations = [(x - 2 / 3) ** 2 for x in (0.5, 0.6, 0.9)]
    assert sc["mean"] == pytest.approx(2 / 3) and sc["std"] == pytest.approx(math.sqrt(sum(deviations) / 2))
    assert table["base"]["metrics"]["greedy_accuracy"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert "rows" not in table["a"]["metrics"]
    text = format_markdown(table)
    assert "| A | 3 | 0.900 ± 0.100 |" in text and "+0.200 |" in text       # Δ greedy vs base: 0.9 - 0.7
    assert "| B | 1 | 0.250 |" in text and "-0.450 |" in text              # one seed: no spread shown
    assert mean_spread([1.0, float("nan"), 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))


def _write(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / name
    OmegaConf.save(OmegaConf.create(data), path)
    return str(path)


def _zoo_config(tmp_path, methods: list[dict], **zoo_extra) -> str:
    method = {"model": {"name_or_path": MODEL, "dtype": "float32"}, "data": {"path": DATA},
              "rewards": [{"name": "math_accuracy"}], "description": "m",
              "trainer": {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 4,
                          "max_steps": 1, "report_to": [], "save_strategy": "no", "logging_steps": 1}}
    path = _write(tmp_path, "method.yaml", method)
    cfg = {"description": "zoo", "model": {"name_or_path": MODEL, "dtype": "float32"},
           "data": {"path": DATA, "eval_split": "test"},
           "eval": {"max_rows": 8, "batch_size": 8, "max_new_tokens": 3, "num_samples": 2, "self_certainty": True},
           "zoo": {"seeds": [0], "methods": [{"config": path, **m} for m in methods], **zoo_extra},
           "output_dir": str(tmp_path / "zoo")}
    return _write(tmp_path, "zoo.yaml", cfg)


def _fake_compute(calls):
    def compute(cfg, cell, test):
        calls.append((cell.method, cell.seed))
        value = {"base": 0.5, "a": 0.6, "b": 0.8}[cell.method] + 0.01 * cell.seed
        return {"method": cell.method, "label": cell.label, "seed": cell.seed, "report": {"greedy_accuracy": value},
                "history": [], "train_seconds": 0.0, "eval_seconds": 0.0}
    return compute


def test_cells_are_cached_and_only_missing_or_changed_cells_are_computed(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(zoo, "compute", _fake_compute(calls))
    path = _zoo_config(tmp_path, [{"name": "a"}, {"name": "b", "overrides": ["trainer.learning_rate=1e-6"]}])
    args = ["--config", path, "--seeds", "0,1"]
    table = zoo.main(args)
    assert sorted(calls) == sorted((m, s) for m in ("base", "a", "b") for s in (0, 1))
    assert table["b"]["metrics"]["greedy_accuracy"]["mean"] == pytest.approx(0.805)
    calls.clear()
    assert zoo.main(args) == table and calls == []                           # everything cached
    zoo.main(["--config", path, "--seeds", "0,1,2"])                          # a new seed: only its cells
    assert sorted(calls) == [("a", 2), ("b", 2), ("base", 2)]
    calls.clear()
    zoo.main([*args, "zoo.methods.1.overrides=[trainer.learning_rate=2e-6]"])   # b's config changed: b only
    assert sorted(calls) == [("b", 0), ("b", 1)]
    calls.clear()
    next((tmp_path / "zoo" / "cells" / "a").glob("seed1-*.json")).unlink()
    partial = zoo.main([*args, "--cached"])                                  # tabulates what exists, computes nothing
    assert calls == [] and partial["a"]["seeds"] == [0] and partial["b"]["seeds"] == [0, 1]
    zoo.main([*args, "--methods", "a"])
    assert calls == [("a", 1)]
    out = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert list(out["table"]) == ["base", "a"] and (tmp_path / "zoo" / "zoo.md").is_file()
    assert (tmp_path / "zoo" / "plots" / "accuracy_bars.png").is_file()


def test_a_method_without_its_config_file_is_skipped_with_a_logged_line(tmp_path, caplog):
    path = _zoo_config(tmp_path, [{"name": "a"}, {"name": "later", "config": str(tmp_path / "not_yet.yaml")}])
    with caplog.at_level(logging.INFO, logger="intrinsic"):
        _, cells, _ = zoo.configure(["--config", path])
    assert {c.method for c in cells} == {"base", "a"}
    assert any("skip later" in r.message and "not_yet.yaml" in r.message for r in caplog.records)


@pytest.mark.parametrize("methods, argv, key", [
    ([{"name": "a", "nmae": "x"}], [], "zoo.methods[0].nmae"),
    ([{"name": "a", "recipe": "evaluate"}], [], "zoo.methods[0].recipe"),
    ([{"name": "a"}, {"name": "a"}], [], "zoo.methods"),
    ([{"name": "a"}], ["--methods", "b"], "--methods"),
    ([{"name": "a"}], ["--seeds", "0,x"], "--seeds"),
    ([{"name": "a", "overrides": ["trainer.learnin_rate=1"]}], [], "trainer.learnin_rate"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, methods, argv, key):
    path = _zoo_config(tmp_path, methods)
    with pytest.raises(SystemExit) as done:
        zoo.configure(["--config", path, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and key in err[0], err


def test_a_tiny_zoo_end_to_end(tmp_path, tiny_model_dir):
    """GRPO-gold and the self-improvement loop, 1 seed, 1 step / 1 round each, plus the base row."""
    si = {"model": {"name_or_path": MODEL, "dtype": "float32"}, "description": "si",
          "data": {"path": DATA, "max_rows": 8},
          "rewards": [{"name": "majority_vote"}],
          "improve": {"iterations": 1, "num_samples": 2, "max_new_tokens": 3, "batch_size": 8, "min_share": 0.0},
          "trainer": {"max_steps": 1, "per_device_train_batch_size": 8, "report_to": [], "save_strategy": "no"}}
    path = _zoo_config(tmp_path, [
        {"name": "gold", "label": "GRPO gold"},
        {"name": "si", "recipe": "self_improve", "config": _write(tmp_path, "si.yaml", si), "budget": False,
         "trained": "round_1/model"}], budget=["trainer.learning_rate=1e-5"])
    table = zoo.main(["--config", path])
    assert list(table) == ["base", "gold", "si"]
    for row in table.values():
        metrics = row["metrics"]
        assert 0 <= metrics["greedy_accuracy"]["mean"] <= 1 and metrics["greedy_accuracy"]["n"] == 1
        assert {"sampled_accuracy", "vote_accuracy", "sc_auc"} <= set(metrics)
    cell = json.loads(next((tmp_path / "zoo" / "cells" / "gold").glob("seed0-*.json")).read_text())
    assert cell["history"] and cell["model"].endswith("runs/gold/seed0") and "train_accuracy" in cell["report"]
    assert json.loads(next((tmp_path / "zoo" / "cells" / "si").glob("seed0-*.json")).read_text())["model"].endswith(
        "round_1/model")
    assert (tmp_path / "zoo" / "plots" / "accuracy_bars.png").is_file()
    assert (tmp_path / "zoo" / "plots" / "reward.png").is_file()
    assert "GRPO gold" in (tmp_path / "zoo" / "zoo.md").read_text()
