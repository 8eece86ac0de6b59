import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from recipes.common.modeling import load_model, load_tokenizer
from recipes.common.schema import ModelConfig
from recipes.common.tiny import TinyURIError, parse_model_uri, resolve_tiny_dataset, resolve_tiny_model
from recipes.common.tiny.models import TinyModelSpec, build_tiny_model
from recipes.common.tiny.tasks import ArithmeticSpec, arithmetic_dataset
from recipes.common.tiny.tokenizer import build_char_tokenizer


@pytest.mark.parametrize("family", ["qwen2", "llama", "t5"])
def test_factories_are_deterministic_and_run(family):
    spec = TinyModelSpec(family=family, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    a, b = build_tiny_model(spec), build_tiny_model(spec)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    other = build_tiny_model(TinyModelSpec(family=family, layers=2, hidden=32, heads=4, intermediate=64, seed=1))
    assert not torch.equal(next(a.parameters()), next(other.parameters()))
    tok = build_char_tokenizer()
    ids = tok(["12+3=", "7*8="], return_tensors="pt", padding=True)
    extra = {"decoder_input_ids": ids["input_ids"][:, :2]} if family == "t5" else {}
    logits = a(**ids, **extra).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    assert a.config.is_encoder_decoder == (family == "t5")


def test_model_uri_resolves_to_a_loadable_directory(tiny_cache):
    path = resolve_tiny_model("tiny://llama?layers=1&hidden=32&intermediate=64")
    assert path.startswith(str(tiny_cache))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    assert model.config._name_or_path == path  # what TRL rebuilds its reference model from
    assert resolve_tiny_model("tiny://llama?hidden=32&layers=1&intermediate=64") == path  # cached, order-free
    assert json.loads((__import__("pathlib").Path(path) / "tiny_spec.json").read_text())["model"]["hidden"] == 32


def test_seq2seq_uri_loads_through_the_common_path():
    cfg = ModelConfig(name_or_path="tiny://t5?layers=1&hidden=32&intermediate=64")
    model = load_model(cfg)
    assert isinstance(model, AutoModelForSeq2SeqLM._model_mapping[type(model.config)])
    assert load_tokenizer(cfg).pad_token == "<pad>"


def test_saved_directory_round_trip(tmp_path, tiny_model_dir):
    """The loading code for real checkpoints, exercised on a local directory saved from a tiny model."""
    model = load_model(ModelConfig(name_or_path=tiny_model_dir, dtype="float32"))
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_model_dir))
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "copy"), dtype="bfloat16"))
    assert again.dtype == torch.bfloat16
    for pa, pb in zip(model.parameters(), again.parameters()):
        assert torch.allclose(pa.to(torch.bfloat16), pb)


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("tiny://gpt9", "unknown tiny model family 'gpt9'"),
        ("tiny://qwen2?hiden=64", "unknown option(s) ['hiden']"),
        ("tiny://qwen2?layers=two", "layers='two' is not a int"),
        ("tiny://qwen2-chess", "unknown tiny task 'chess'"),
        ("tiny://qwen2-arith?ops=div", "ops must be a comma-separated subset"),
        ("tiny://t5-arith", "decoder-only families only"),
    ],
)
def test_bad_model_uris(uri, fragment):
    with pytest.raises(TinyURIError, match=None) as err:
        parse_model_uri(uri)
    assert fragment in str(err.value)


def test_arithmetic_is_deterministic_disjoint_and_correct():
    spec = ArithmeticSpec(ops="add,sub,mul", digits=2, n_train=3000, n_test=200, seed=3)
    train, test = arithmetic_dataset(spec, "train"), arithmetic_dataset(spec, "test")
    assert train["question"] == arithmetic_dataset(spec, "train")["question"]
    assert train["question"] != arithmetic_dataset(ArithmeticSpec(ops="add,sub,mul", n_train=3000, seed=4), "train")["question"]
    assert not set(train["question"]) & set(test["question"])
    assert len(set(test["question"])) == len(test) == 200
    for row in list(train) + list(test):
        expr = row["question"].rstrip("=")
        assert int(row["answer"]) == eval(expr), row  # noqa: S307 - generated digits and operators only
        assert row["completion"] == row["answer"]
        a, b = (int(x) for x in expr.replace("*", "+").replace("-", "+").split("+"))
        assert max(a, b) <= 99
    assert {q[next(i for i, c in enumerate(q[1:], 1) if not c.isdigit())] for q in train["question"]} == {"+", "-", "*"}


def test_dataset_uri_options():
    data = resolve_tiny_dataset("tiny://arithmetic?ops=mul&digits=1&n_train=50", "train")
    assert len(data) == 50 and all("*" in q for q in data["question"])
    with pytest.raises(TinyURIError, match="unknown option"):
        resolve_tiny_dataset("tiny://arithmetic?digit=1", "train")


def test_a_small_problem_space_holds_out_what_it_has():
    """One-digit problems: the held-out split is every held-out problem (counted, not estimated),
    and a space that holds out none is refused instead of sampling forever."""
    from recipes.common.tiny.tasks import ArithmeticSpec, arithmetic_rows, problem_split

    spec = ArithmeticSpec(digits=1, n_test=500)
    rows = arithmetic_rows(spec, "test")
    expected = {f"{a}+{b}=" for a in range(10) for b in range(10) if problem_split(a, "+", b, 0.1) == "test"}
    assert {r["question"] for r in rows} == expected and len(rows) == len(expected)
    with pytest.raises(ValueError, match="holds out no problem"):
        arithmetic_rows(ArithmeticSpec(digits=1, ops="mul", test_fraction=0.001), "test")
