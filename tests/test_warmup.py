"""The supervised warm-up turns a random tiny model into a partly competent one, cached by spec."""

import json
from pathlib import Path

from recipes.common.data import load_split
from recipes.common.evaluation import evaluate_model
from recipes.common.modeling import load_model, load_tokenizer
from recipes.common.schema import DataConfig, EvalConfig, ModelConfig
from recipes.common.tiny import resolve_tiny_model
from recipes.common.tiny.uri import _key, parse_model_uri
from tests.conftest import TEST_WARMUP

EVAL = EvalConfig(max_rows=200, batch_size=100, max_new_tokens=6, greedy=True, sampled=False)


def held_out_accuracy(path: str) -> float:
    cfg = ModelConfig(name_or_path=path, dtype="float32")
    data = load_split(DataConfig(path="tiny://arithmetic?ops=add&digits=2"), "test", max_rows=EVAL.max_rows)
    return evaluate_model(load_model(cfg), load_tokenizer(cfg), data, EVAL)["greedy_accuracy"]


def test_warmup_improves_held_out_accuracy(warm_model_dir, tiny_cache):
    base = resolve_tiny_model(TEST_WARMUP.replace("qwen2-arith", "qwen2").split("&steps")[0])
    before, after = held_out_accuracy(base), held_out_accuracy(warm_model_dir)
    assert before <= 0.02, before  # random init: nothing
    assert after >= 0.30, after  # partly competent on problems it never saw
    # the warm-up ran through the sft recipe, which left its resolved config and report behind
    out = Path(warm_model_dir)
    assert (out / "config.yaml").exists() and (out / "DONE").exists()
    assert json.loads((out / "eval.json").read_text())["after"]["greedy_accuracy"] >= 0.30


def test_warmup_is_cached_by_spec(warm_model_dir):
    stamp = (Path(warm_model_dir) / "model.safetensors").stat().st_mtime_ns
    assert resolve_tiny_model(TEST_WARMUP) == warm_model_dir  # no second warm-up
    assert (Path(warm_model_dir) / "model.safetensors").stat().st_mtime_ns == stamp
    other = TEST_WARMUP.replace("steps=1000", "steps=1001")
    assert _key(*parse_model_uri(TEST_WARMUP)) != _key(*parse_model_uri(other))  # another spec, another cache entry
