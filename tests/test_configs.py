"""Every YAML under configs/ loads and validates with its recipe's schema (configs never rot)."""

import importlib

import pytest

from recipes.__main__ import CONFIGS, config_files, recipe_names
from recipes.config import RecipeConfig, load_config
from tests.conftest import run_module

ALL = [(recipe, path) for recipe, paths in config_files().items() for path in paths]


def schema_of(recipe: str) -> type[RecipeConfig]:
    module = importlib.import_module(f"recipes.{recipe}")
    schemas = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, RecipeConfig) and v.__module__ == module.__name__]
    assert len(schemas) == 1, f"recipes.{recipe} must define exactly one RecipeConfig subclass"
    return schemas[0]


def test_every_config_directory_is_a_recipe():
    assert set(config_files()) <= set(recipe_names())
    assert ALL, "no configs found"


@pytest.mark.parametrize("recipe, path", ALL, ids=[str(p.relative_to(CONFIGS)) for _, p in ALL])
def test_config_validates(recipe, path):
    cfg = load_config(schema_of(recipe), path)
    assert cfg.description, f"{path} needs a one-line description"


def test_list_shows_every_recipe_and_config():
    result = run_module("recipes", "list")
    assert result.returncode == 0, result.stderr
    for name in recipe_names():
        assert any(line.startswith(name) for line in result.stdout.splitlines()), name
    for _, path in ALL:
        assert str(path.relative_to(CONFIGS.parent)) in result.stdout
