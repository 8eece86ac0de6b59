"""Bad input as a new user makes it: every kind ends in one ``error:`` line, exit code 2, no traceback,
and before any model weights load.

The model named by the configs is a tiny model directory whose weights file is junk: loading its
weights raises, so a kind that reached the model load would fail with a traceback (the control
test ``test_a_good_config_reaches_the_weights`` proves the junk is read when nothing stops the run).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from recipes.common.cli import main

HEADER = """\
model: {{name_or_path: "{model}", dtype: float32}}
data: {{path: "tiny://arithmetic?n_train=32&n_test=8", prompt: plain}}
eval: {{max_rows: 4, max_new_tokens: 4, batch_size: 4}}
"""
RLIF = HEADER + """\
rewards: [{{name: self_certainty}}]
trainer: {{learning_rate: 1.0e-5, max_steps: 1, per_device_train_batch_size: 4, num_generations: 4,
          max_completion_length: 4, output_dir: "{out}", report_to: []}}
"""


@pytest.fixture(scope="module")
def junk_model(tmp_path_factory, tiny_cache) -> Path:
    """A tiny Qwen2 directory (config, tokenizer) whose weights cannot be loaded."""
    from recipes.common.tiny import resolve_tiny_model

    source = Path(resolve_tiny_model("tiny://qwen2?layers=2&hidden=64&intermediate=256"))
    target = tmp_path_factory.mktemp("junk") / "model"
    shutil.copytree(source, target)
    for weights in target.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return target


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _rlif(d: Path, model: Path, extra: str = "") -> str:
    return RLIF.format(model=model, out=d / "out") + textwrap.dedent(extra)


def _jsonl(d: Path, text: str, suffix: str = ".jsonl") -> Path:
    return _write(d / f"rows{suffix}", text)


# kind -> (recipe, builder(dir, model) -> (config path, overrides), expected text in the error line)
def k_duplicate_key(d, m):
    return _write(d / "c.yaml", _rlif(d, m) + "rewards: [{name: negative_entropy}]\n"), []


def k_yaml_syntax(d, m):
    return _write(d / "c.yaml", _rlif(d, m) + "eval: {max_rows: 4\n"), []


def k_tab_indent(d, m):
    return _write(d / "c.yaml", _rlif(d, m) + "vars:\n\tname: x\n"), []


def k_missing_interpolation(d, m):
    return _write(d / "c.yaml", _rlif(d, m) + "description: ${vars.nowhere}\n"), []


def k_empty_data_file(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={_jsonl(d, '')}"]


def k_truncated_jsonl(d, m):
    rows = '{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "ans'
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={_jsonl(d, rows)}"]


def k_not_json_rows(d, m):
    rows = _jsonl(d, "question,answer\n1+1=,2\n")
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={rows}"]


def k_missing_column(d, m):
    rows = '{"problem": "1+1=", "answer": "2"}\n'
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={_jsonl(d, rows)}"]


def k_wrong_column_type(d, m):
    rows = '{"question": 11, "answer": "2"}\n{"question": 12, "answer": "3"}\n'
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={_jsonl(d, rows)}"]


def k_unsupported_file_type(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [f"data.path={_jsonl(d, 'x', '.txt')}"]


def k_wrong_type(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.max_steps=many"]


def k_negative_learning_rate(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.learning_rate=-1e-5"]


def k_bad_adam_beta(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.adam_beta2=1.5"]


def k_zero_batch_size(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.per_device_train_batch_size=0"]


def k_negative_batch_size(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.per_device_train_batch_size=-4"]


def k_zero_eval_batch_size(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["eval.batch_size=0"]


def k_zero_every_steps(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["eval.every_steps=0"]


def k_every_steps_without_held_out(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["eval.every_steps=5", "data.eval_split=null"]


def k_num_generations_not_dividing(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.num_generations=3"]


def k_ic_layer_beyond_depth(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: internal_consistency, kwargs: {layers: [2, 7]}}]"]


def k_eval_ic_layer_beyond_depth(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["eval.internal_consistency=true", "eval.ic_layers=[9]"]


def k_unknown_reward(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: self_certainty_}]"]


def k_bad_reward_kwargs(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: self_certainty, kwargs: {nonsense: 1}}]"]


def k_transform_clip_reversed(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: self_certainty, transform: {clip: [1, 0]}}]"]


def k_transform_unknown_key(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: self_certainty, transform: {clamp: [0, 1]}}]"]


def k_transform_unknown_name(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["rewards=[{name: self_certainty, transform: ranks}]"]


def k_eval_pc_one_sample(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["eval.perplexity_consistency=true", "eval.num_samples=1"]


def k_nonexistent_model_path(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [f"model.name_or_path={d / 'no-such-model'}"]


def k_unknown_hub_model(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["model.name_or_path=nobody-here/no-such-model"]


def k_unknown_hub_model_evaluate(d, m):
    text = HEADER.format(model=m) + f"output_dir: '{d / 'out'}'\n"
    return _write(d / "c.yaml", text), ["model.name_or_path=nobody-here/no-such-model"]


def k_tokenizer_without_pad_or_eos(d, m):
    model = d / "model"
    shutil.copytree(m, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(pad_token=None, eos_token=None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    return _write(d / "c.yaml", _rlif(d, model)), []


def k_config_is_a_directory(d, m):
    return d, []


def k_model_dir_without_config(d, m):
    (d / "empty-model").mkdir()
    return _write(d / "c.yaml", _rlif(d, m)), [f"model.name_or_path={d / 'empty-model'}"]


def k_bad_override_syntax(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.learning_rate"]


def k_bad_override_value(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.learning_rate=[1e-5"]


def k_base_missing(d, m):
    return _write(d / "c.yaml", "base: [nowhere.yaml]\n" + _rlif(d, m)), []


def k_base_cycle(d, m):
    _write(d / "a.yaml", "base: [c.yaml]\n")
    return _write(d / "c.yaml", "base: [a.yaml]\n" + _rlif(d, m)), []


def k_config_file_missing(d, m):
    return d / "no-such-config.yaml", []


def k_top_level_list(d, m):
    return _write(d / "c.yaml", "- model\n- data\n"), []


def k_wrong_prompt_template(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["data.prompt=math_boxd"]


def k_unknown_key(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["trainer.learnin_rate=1e-5"]


def k_quantization_on_cpu(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["model.quantization={bits: 4}", "peft={r: 4}"]


def k_peft_and_adapter(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [f"model.adapter={d}", "peft={r: 4}"]


def k_zero_lora_rank(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["peft={r: 0}"]


def k_bad_decred_layers(d, m):
    text = HEADER.format(model=m) + f"decred: {{layers: [1, 1]}}\ntrainer: {{output_dir: '{d / 'out'}'}}\n"
    data = _jsonl(d, '{"question": "1+1=", "answer": "2", "completion": "2"}\n')
    return _write(d / "c.yaml", text), [f"data.path={data}"]


def k_decred_layer_beyond_depth(d, m):
    text = HEADER.format(model=m) + f"decred: {{layers: [5]}}\ntrainer: {{output_dir: '{d / 'out'}'}}\n"
    data = _jsonl(d, '{"question": "1+1=", "answer": "2", "completion": "2"}\n')
    return _write(d / "c.yaml", text), [f"data.path={data}"]


def k_negative_max_rows(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["data.max_rows=-1"]


def k_improve_zero_samples(d, m):
    text = HEADER.format(model=m) + (f"rewards: [{{name: majority_vote}}]\nimprove: {{num_samples: 0}}\n"
                                     f"trainer: {{output_dir: '{d / 'out'}'}}\n")
    return _write(d / "c.yaml", text), []


GPQA = ["data.path=tiny://gpqa", "data.columns={question: Question}"]


def k_choices_column_missing(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [*GPQA, "data.choices={correct: Right Answer, incorrect: [Incorrect Answer 1]}"]


def k_choices_one_option(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), [*GPQA, "data.choices={correct: Correct Answer, incorrect: []}"]


def k_choices_and_answer_column(d, m):
    return _write(d / "c.yaml", _rlif(d, m)), ["data.path=tiny://gpqa", "data.columns={question: Question, answer: Question}",
                                               "data.choices={correct: Correct Answer, incorrect: [Incorrect Answer 1]}"]


def k_choice_grader_numeric_gold(d, m):
    text = HEADER.format(model=m) + f"output_dir: '{d / 'out'}'\n"
    return _write(d / "c.yaml", text), ["eval.grader=choice"]


KINDS = {
    # name: (recipe, builder, text the error line must contain)
    "yaml duplicate key": ("rlif", k_duplicate_key, "duplicate key"),
    "yaml syntax error": ("rlif", k_yaml_syntax, "invalid YAML"),
    "yaml tab indentation": ("rlif", k_tab_indent, "invalid YAML"),
    "missing ${} interpolation key": ("rlif", k_missing_interpolation, "description"),
    "empty data file": ("rlif", k_empty_data_file, "rows.jsonl"),
    "truncated jsonl": ("rlif", k_truncated_jsonl, "rows.jsonl"),
    "jsonl that is csv": ("rlif", k_not_json_rows, "rows.jsonl"),
    "missing column": ("rlif", k_missing_column, "data.columns.question"),
    "non-text question column": ("rlif", k_wrong_column_type, "question"),
    "unsupported data file type": ("rlif", k_unsupported_file_type, "data.path"),
    "wrong value type": ("rlif", k_wrong_type, "trainer.max_steps"),
    "negative learning rate": ("rlif", k_negative_learning_rate, "trainer.learning_rate"),
    "adam beta out of range": ("rlif", k_bad_adam_beta, "trainer.adam_beta2"),
    "zero batch size": ("rlif", k_zero_batch_size, "trainer.per_device_train_batch_size"),
    "negative batch size": ("rlif", k_negative_batch_size, "trainer.per_device_train_batch_size"),
    "zero eval batch size": ("rlif", k_zero_eval_batch_size, "eval.batch_size"),
    "zero eval.every_steps": ("rlif", k_zero_every_steps, "eval.every_steps: must be >= 1"),
    "eval.every_steps without held-out data": ("rlif", k_every_steps_without_held_out, "eval.every_steps: needs held-out"),
    "num_generations not dividing": ("rlif", k_num_generations_not_dividing, "num_generations"),
    "IC reward layer beyond depth": ("rlif", k_ic_layer_beyond_depth, "rewards[0].kwargs.layers"),
    "eval IC layer beyond depth": ("rlif", k_eval_ic_layer_beyond_depth, "eval.ic_layers"),
    "unknown reward": ("rlif", k_unknown_reward, "rewards[0].name"),
    "bad reward kwargs": ("rlif", k_bad_reward_kwargs, "rewards.0.kwargs"),
    "transform clip lo > hi": ("rlif", k_transform_clip_reversed, "rewards[0].transform"),
    "transform unknown key": ("rlif", k_transform_unknown_key, "rewards[0].transform"),
    "transform unknown name": ("rlif", k_transform_unknown_name, "rewards[0].transform"),
    "eval perplexity consistency with one sample": ("rlif", k_eval_pc_one_sample, "eval.perplexity_consistency"),
    "nonexistent model path": ("rlif", k_nonexistent_model_path, "model.name_or_path"),
    "model dir without config.json": ("rlif", k_model_dir_without_config, "model.name_or_path"),
    "unknown Hub model": ("rlif", k_unknown_hub_model, "model.name_or_path: cannot load the tokenizer"),
    "unknown Hub model (evaluate)": ("evaluate", k_unknown_hub_model_evaluate, "model.name_or_path: cannot load the config"),
    "tokenizer without pad or EOS": ("rlif", k_tokenizer_without_pad_or_eos, "neither a pad nor an EOS"),
    "config path is a directory": ("rlif", k_config_is_a_directory, "is a directory"),
    "override without =": ("rlif", k_bad_override_syntax, "trainer.learning_rate"),
    "override value unparsable": ("rlif", k_bad_override_value, "trainer.learning_rate"),
    "base file missing": ("rlif", k_base_missing, "nowhere.yaml"),
    "base cycle": ("rlif", k_base_cycle, "circular"),
    "config file missing": ("rlif", k_config_file_missing, "no-such-config.yaml"),
    "top level not a mapping": ("rlif", k_top_level_list, "mapping"),
    "wrong prompt template": ("rlif", k_wrong_prompt_template, "data.prompt"),
    "unknown key": ("rlif", k_unknown_key, "trainer.learning_rate"),
    "quantization on CPU": ("rlif", k_quantization_on_cpu, "model.quantization"),
    "peft and adapter together": ("rlif", k_peft_and_adapter, "peft"),
    "zero LoRA rank": ("rlif", k_zero_lora_rank, "peft.r"),
    "decred layers repeated": ("decred", k_bad_decred_layers, "decred"),
    "decred layer beyond depth": ("decred", k_decred_layer_beyond_depth, "decred.layers"),
    "negative max_rows": ("rlif", k_negative_max_rows, "data.max_rows"),
    "self_improve zero samples": ("self_improve", k_improve_zero_samples, "improve.num_samples"),
    "choices column missing": ("rlif", k_choices_column_missing, "data.choices.correct"),
    "choices with one option": ("rlif", k_choices_one_option, "data.choices.incorrect"),
    "choices and an answer column": ("rlif", k_choices_and_answer_column, "data.columns.answer"),
    "choice grader, gold not a letter": ("evaluate", k_choice_grader_numeric_gold, "eval.grader"),
}


def _entry(recipe: str):
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    schema = next(v for k, v in vars(module).items() if k.endswith("RecipeConfig") and v.__module__ == module.__name__)
    return schema, module.run


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_is_one_error_line(kind, junk_model, tmp_path, capsys):
    recipe, build, expected = KINDS[kind]
    config, overrides = build(tmp_path, junk_model)
    schema, run = _entry(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(recipe, schema, run, ["--config", str(config), *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]


def test_bad_input_subprocess_one_line(junk_model, tmp_path):
    """The same through ``python -m``: stderr is exactly one ``error:`` line."""
    from tests.conftest import run_module

    config, overrides = k_duplicate_key(tmp_path, junk_model)
    result = run_module("recipes.rlif", "--config", str(config), *overrides)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(result.stderr.strip().splitlines()) == 1 and "duplicate key" in result.stderr


def test_a_good_config_reaches_the_weights(junk_model, tmp_path):
    """Control: with nothing wrong the run goes on to load the (junk) weights and fails there."""
    config = _write(tmp_path / "c.yaml", _rlif(tmp_path, junk_model))
    schema, run = _entry("rlif")
    with pytest.raises(Exception) as info:
        main("rlif", schema, run, ["--config", str(config)])
    assert not isinstance(info.value, SystemExit)
    assert "safetensors" in (str(info.value) + repr(info.value)).lower() or "header" in str(info.value).lower()
