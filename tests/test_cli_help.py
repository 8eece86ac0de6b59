"""Every program's ``--help`` (its description, config sections and keys, its own flags), and
``--print-config`` (the resolved config as YAML that loads back to the same config; a bad config
still gives one ``error:`` line and exit code 2). Programs run as ``python -m recipes.<name>`` does,
through their ``__main__`` block (``runpy``), in this process."""

import dataclasses
import runpy
import sys

import pytest

from recipes.__main__ import config_files, recipe_names
from recipes.common.config import load_config
from recipes.common.schema import dataclass_in, type_hints
from tests.test_configs import schema_of

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module

# each recipe with configs: one that loads on a CPU machine (the tiny world)
TINY = {recipe: next(p for p in paths if p.name.startswith("tiny")) for recipe, paths in config_files().items()}
RECIPES = sorted(TINY)


def run_program(name: str, *argv: str, monkeypatch) -> int:
    """``python -m recipes.<name> *argv`` in this process; its exit code (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [f"recipes.{name}", *argv])
    try:
        runpy.run_module(f"recipes.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code or 0
    return 0


def words(text: str) -> str:
    return " ".join(text.split())


def test_every_config_directory_has_a_tiny_config():
    assert set(RECIPES) == {"alol", "decred", "evaluate", "intuitor", "rlif", "self_improve", "sft", "zoo"}


@pytest.mark.parametrize("name", recipe_names())
def test_help_describes_the_program(name, monkeypatch, capsys):
    import importlib

    doc = importlib.import_module(f"recipes.{name}").__doc__.strip().split("\n\n")[0]
    assert run_program(name, "--help", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert words(doc) in words(out), name
    assert f"python -m recipes.{name}" in out


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_lists_sections_keys_and_flags(recipe, monkeypatch, capsys):
    schema = schema_of(recipe)
    assert run_program(recipe, "--help", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for flag in ("--config", "--print-config", "--debug") + (("--dry-run",) if recipe != "zoo" else ()):
        assert flag in out  # the zoo runs other recipes' configs: each of those has its own --dry-run
    hints = type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name == "trainer":
            continue
        assert any(line.startswith(f"{f.name}:") for line in lines), f"section {f.name} missing"
        inner = dataclass_in(hints[f.name])
        for key in dataclasses.fields(inner) if inner else ():
            assert any(line.split()[:1] == [key.name] for line in lines), f"{f.name}.{key.name} missing"
    if schema.trainer_class is not None:  # every field of the TRL config class, with its default
        assert schema.trainer_class.__name__ in out
        for f in dataclasses.fields(schema.trainer_class):
            if f.init and not f.name.startswith("_"):
                assert any(line.split()[:1] == [f.name] for line in lines), f"trainer.{f.name} missing"
        assert "learning_rate" in out and "[default: " in out
    else:
        assert "trainer: none" in out
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(schema)}
    assert words(help_of["model"]) in words(out) and "default: 200]" in out  # help text and a default (eval.max_rows)


def test_evaluate_help_shows_compare_and_compare_runs(tmp_path, monkeypatch, capsys):
    from recipes.common.evaluation import write_report

    assert run_program("evaluate", "--help", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "--compare RUN [RUN ...]" in out and "side by side" in out
    write_report({"model": {"greedy_accuracy": 0.5}}, tmp_path / "run_a", meta={"models": {"model": "x"}})
    assert run_program("evaluate", "--compare", str(tmp_path / "run_a"), monkeypatch=monkeypatch) == 0
    assert "run_a/model" in capsys.readouterr().out
    assert run_program("evaluate", monkeypatch=monkeypatch) == 2  # neither --config nor --compare
    assert "the following arguments are required: --config" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_round_trips(recipe, tmp_path, monkeypatch, capsys):
    path, overrides = TINY[recipe], ["description=printed", "vars.extra=7", "eval.seed=5"]
    assert run_program(recipe, "--config", str(path), "--print-config", *overrides, monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    schema = schema_of(recipe)
    cfg, again = load_config(schema, path, overrides), load_config(schema, printed)
    assert again.description == "printed" and again.vars["extra"] == 7 and again.eval.seed == 5  # overrides applied
    assert dataclasses.replace(again, source="", trainer=None) == dataclasses.replace(cfg, source="", trainer=None)
    if schema.trainer_class is not None:
        assert again.trainer.to_dict() == cfg.trainer.to_dict()
    assert "trust_remote_code: false" in out and "split_on: null" in out  # every section with its defaults
    assert run_program(recipe, "--config", str(printed), "--print-config", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out == out  # printing the printed config changes nothing


@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_of_a_bad_config_is_one_error_line(recipe, monkeypatch, capsys):
    code = run_program(recipe, "--config", str(TINY[recipe]), "--print-config", "model.nme=x", monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: command line: model.nme: unknown key for ModelConfig")
