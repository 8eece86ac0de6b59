"""Config merge, interpolation, overrides, and every validation error (message and exit code)."""

import textwrap

import pytest

from recipes.common.cli import main
from recipes.common.config import load_config, load_raw, save_config
from recipes.common.errors import ConfigError
from recipes.evaluate import EvaluateRecipeConfig
from recipes.sft import SFTRecipeConfig, run as run_sft
from tests.conftest import run_module


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cfg_dir(tmp_path):
    write(tmp_path / "base/common.yaml", """
        model: {name_or_path: tiny://qwen2, dtype: float32}
        data: {path: "tiny://arithmetic?n_train=64", prompt: plain}
        trainer: {learning_rate: 1.0e-4, max_steps: 5, output_dir: "${oc.env:OUT_ROOT,/tmp/out}/${vars.name}"}
        vars: {name: base}
    """)
    write(tmp_path / "base/more.yaml", """
        trainer: {max_steps: 7, per_device_train_batch_size: 4}
        eval: {max_rows: 10}
    """)
    write(tmp_path / "run.yaml", """
        base: [base/common.yaml, base/more.yaml]
        vars: {name: child}
        description: a test config
        trainer: {learning_rate: 2.0e-4}
    """)
    return tmp_path


def test_base_merge_order_interpolation_and_overrides(cfg_dir):
    raw, origins = load_raw(cfg_dir / "run.yaml", ["trainer.max_steps=9", "model.dtype=bfloat16"])
    assert raw["trainer"]["learning_rate"] == 2.0e-4  # the file itself wins over its bases
    assert raw["trainer"]["per_device_train_batch_size"] == 4  # later base adds
    assert raw["trainer"]["max_steps"] == 9  # command line wins over everything
    assert raw["trainer"]["output_dir"].endswith("/child")  # interpolation sees the merged tree
    assert raw["eval"]["max_rows"] == 10 and raw["model"]["dtype"] == "bfloat16"
    assert "base" not in raw
    assert origins[("trainer", "max_steps")] == "command line"
    assert origins[("trainer", "per_device_train_batch_size")].endswith("more.yaml")


def _error(cfg_dir, *overrides, schema=SFTRecipeConfig, name="run.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(schema, cfg_dir / name, list(overrides))
    return err.value


def test_valid_config_builds_typed_objects(cfg_dir):
    cfg = load_config(SFTRecipeConfig, cfg_dir / "run.yaml", ["trainer.seed=3"])
    assert type(cfg.trainer).__name__ == "SFTConfig"
    assert cfg.trainer.learning_rate == 2.0e-4 and cfg.trainer.seed == 3 and cfg.trainer.max_steps == 7
    assert cfg.trainer.bf16 is False  # no GPU here: mixed precision off
    assert cfg.model.dtype == "float32" and cfg.eval.max_rows == 10 and cfg.peft is None


def test_unknown_key_names_file_key_and_closest(cfg_dir):
    err = _error(cfg_dir, "trainer.learnin_rate=1e-3")
    assert str(err) == "command line: trainer.learnin_rate: unknown key for SFTConfig (did you mean 'trainer.learning_rate'?)"
    write(cfg_dir / "typo.yaml", "base: [base/common.yaml]\nmodle: {name_or_path: x}\n")
    err = _error(cfg_dir, name="typo.yaml")
    assert err.source.endswith("typo.yaml") and err.key == "modle" and err.suggestion == "model"


def test_wrong_type(cfg_dir):
    err = _error(cfg_dir, "trainer.max_steps=many")
    assert "trainer.max_steps: expected int, got 'many'" in str(err)
    err = _error(cfg_dir, "model.dtype=float8")
    assert "model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'float8'" in str(err)
    err = _error(cfg_dir, "eval=3")
    assert err.key == "eval" and "expected a EvalConfig section" in str(err)


def test_missing_files(cfg_dir):
    write(cfg_dir / "nobase.yaml", "base: [base/missing.yaml]\n")
    err = _error(cfg_dir, name="nobase.yaml")
    assert err.key == "base" and "file not found" in str(err) and "missing.yaml" in str(err)
    err = _error(cfg_dir, "data.path=./nowhere/train.jsonl")
    assert err.key == "data.path" and "file not found: ./nowhere/train.jsonl" in str(err)
    err = _error(cfg_dir, "model.name_or_path=/no/such/model")
    assert err.key == "model.name_or_path"


def test_missing_required_key(cfg_dir):
    write(cfg_dir / "nomodel.yaml", "data: {path: 'tiny://arithmetic'}\n")
    err = _error(cfg_dir, name="nomodel.yaml")
    assert err.key == "model" and "missing required key" in str(err)


def test_bad_tiny_uri_is_a_config_error(cfg_dir):
    err = _error(cfg_dir, "model.name_or_path=tiny://qwen2?layer=2")
    assert err.key == "model.name_or_path" and "did you mean" not in str(err) and "layers" in str(err)


def test_unknown_reward(cfg_dir):
    write(cfg_dir / "rw.yaml", """
        base: [base/common.yaml]
        rewards:
          - {name: math_accuracy, weight: 0.0}
          - {name: math_acuracy}
    """)
    err = _error(cfg_dir, name="rw.yaml", schema=RewardedConfig)
    assert err.key == "rewards[1].name" and "closest: 'math_accuracy'" in str(err)
    err = _error(cfg_dir, "rewards.0.name=not_a.module.Reward", name="rw.yaml", schema=RewardedConfig)
    assert "cannot import reward 'not_a.module.Reward'" in str(err)


def test_trainer_semantic_error_is_one_line(cfg_dir):
    err = _error(cfg_dir, "trainer.lr_scheduler_type=zigzag")
    assert err.key == "trainer" and "\n" not in str(err)


def test_missing_dataset_column_exits_2_before_model_loads(cfg_dir, tmp_path, capsys):
    data = write(tmp_path / "rows.jsonl", '{"problem": "1+1=", "solution": "2"}\n')
    argv = ["--config", str(cfg_dir / "run.yaml"), f"data.path={data}", "data.columns.question=problme"]
    with pytest.raises(SystemExit) as exit_info:
        main("sft", SFTRecipeConfig, run_sft, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # progress bars of the dataset load may precede it
    assert err.startswith("error: ") and "data.columns.question: column 'problme' not in dataset" in err and "did you mean 'problem'" in err


def test_cli_exit_code_2_and_no_traceback(cfg_dir):
    result = run_module("recipes.sft", "--config", str(cfg_dir / "run.yaml"), "trainer.max_step=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: command line: trainer.max_step: unknown key for SFTConfig (did you mean 'trainer.max_steps'?)"
    ]
    debug = run_module("recipes.sft", "--config", str(cfg_dir / "run.yaml"), "--debug", "trainer.max_step=3")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_saved_config_reloads_to_the_same_run(cfg_dir, tmp_path):
    cfg = load_config(EvaluateRecipeConfig, cfg_dir / "run.yaml", ["compare={a: tiny://llama}"])
    sft = load_config(SFTRecipeConfig, cfg_dir / "run.yaml", ["trainer.warmup_steps=3"])
    path = save_config(sft, tmp_path / "saved")
    again = load_config(SFTRecipeConfig, path)
    assert again.trainer.to_dict() == sft.trainer.to_dict()
    assert (again.model, again.data, again.eval) == (sft.model, sft.data, sft.eval)
    assert cfg.compare == {"a": "tiny://llama"} and cfg.vars == {"name": "child"}


@pytest.mark.parametrize("given", ["trainer.generation_batch_size=256", "trainer.steps_per_generation=2", None])
def test_a_saved_grpo_config_reloads(given, tmp_path):
    """TRL derives generation_batch_size and steps_per_generation from each other and refuses a
    config that sets both: config.yaml keeps the one the config gave (steps_per_generation if neither)."""
    from recipes.rlif import RLIFRecipeConfig

    overrides = [f"trainer.output_dir={tmp_path / 'out'}"] + ([given] if given else [])
    cfg = load_config(RLIFRecipeConfig, "configs/rlif/tiny_arithmetic_gold.yaml", overrides)
    saved = load_raw(save_config(cfg, tmp_path / "saved"))[0]["trainer"]
    kept = (given or "trainer.steps_per_generation").split("=")[0].split(".")[1]
    assert kept in saved and ({"generation_batch_size", "steps_per_generation"} - {kept}).isdisjoint(saved)
    again = load_config(RLIFRecipeConfig, tmp_path / "saved" / "config.yaml")
    assert again.trainer.to_dict() == cfg.trainer.to_dict()


from dataclasses import dataclass, field  # noqa: E402

from recipes.common.schema import RecipeConfig, RewardSpec  # noqa: E402


@dataclass
class RewardedConfig(RecipeConfig):
    """A schema with a rewards section, as the RL recipes have."""

    rewards: list[RewardSpec] = field(default_factory=list)
