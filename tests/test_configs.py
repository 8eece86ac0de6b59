"""Every YAML under configs/ loads and validates with its recipe's schema (configs never rot)."""

import importlib

import pytest

from recipes.__main__ import CONFIGS, config_files, recipe_names
from recipes.common.cli import main
from recipes.common.config import load_config, load_raw
from recipes.common.errors import ConfigError
from recipes.common.schema import RecipeConfig
from tests.conftest import run_module
from trainers.distributed import no_accelerator

ALL = [(recipe, path) for recipe, paths in config_files().items() for path in paths]


def schema_of(recipe: str) -> type[RecipeConfig]:
    module = importlib.import_module(f"recipes.{recipe}")
    schemas = {v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, RecipeConfig) and v is not RecipeConfig}
    assert len(schemas) == 1, f"recipes.{recipe} must use exactly one RecipeConfig subclass"
    return schemas.pop()


# training configs for real models (paper reproductions); evaluation configs compare run outputs
PAPER = [(recipe, path) for recipe, path in ALL
         if recipe != "evaluate" and not load_raw(path)[0]["model"]["name_or_path"].startswith("tiny://")]


def test_every_config_directory_is_a_recipe():
    assert set(config_files()) <= set(recipe_names())
    assert ALL, "no configs found"


@pytest.mark.parametrize("recipe, path", ALL, ids=[str(p.relative_to(CONFIGS)) for _, p in ALL])
def test_config_validates(recipe, path):
    overrides = []
    if load_raw(path)[0]["model"].get("quantization") and no_accelerator():  # QLoRA configs: refused without a GPU
        with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
            load_config(schema_of(recipe), path)
        assert err.value.key == "model.quantization"
        overrides = ["model.quantization=null"]
    cfg = load_config(schema_of(recipe), path, overrides)
    assert cfg.description, f"{path} needs a one-line description"
    if cfg.launch:
        assert (CONFIGS.parent / cfg.launch).is_file(), cfg.launch


def test_paper_configs_declare_their_launch():
    assert len(PAPER) >= 5
    for recipe, path in PAPER:
        cpu = ["model.quantization=null"] if no_accelerator() else []  # QLoRA configs need a GPU to validate
        assert load_config(schema_of(recipe), path, cpu).launch, path


@pytest.mark.parametrize("recipe, path", PAPER, ids=[str(p.relative_to(CONFIGS)) for _, p in PAPER])
def test_dry_run(recipe, path, capsys):
    """Every paper config runs its real recipe for 2 steps on a tiny stand-in (a test per config)."""
    module = importlib.import_module(f"recipes.{recipe}")
    main(recipe, schema_of(recipe), module.run, ["--config", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert f"dry run of {path}" in out


def test_list_shows_every_recipe_and_config():
    result = run_module("recipes", "list")
    assert result.returncode == 0, result.stderr
    for name in recipe_names():
        assert any(line.startswith(name) for line in result.stdout.splitlines()), name
    for _, path in ALL:
        assert str(path.relative_to(CONFIGS.parent)) in result.stdout
