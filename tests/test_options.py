"""No option validates and is then ignored: every field of every config section, set to a value other
than its default, reaches what the recipe builds (or is refused with one config line).

``test_every_field_has_a_probe`` walks the schema of every recipe (each dataclass section, nested
ones included) and fails for a field without a probe here, so a new option needs one. Each probe
builds the recipe's objects without training: the recipe's trainer class (or the first function
past the point of interest) is replaced by a recorder that captures its arguments and stops the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from recipes.common.config import load_config
from recipes.common.errors import ConfigError
from recipes.common.schema import RecipeConfig

MODEL = "tiny://qwen2?layers=2&hidden=64&intermediate=256"
RECIPES = ("rlif", "sft", "alol", "decred", "self_improve", "evaluate", "zoo")
ROWS = [{"question": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b), "problem": f"{a} plus {b}"}
        for a in range(1, 7) for b in range(1, 7)]


class Built(Exception):
    """Raised by a recorder: the run stops where the recorded object would have been built."""

    def __init__(self, *args, **kwargs):
        super().__init__("built")
        self.args, self.kwargs = args, kwargs


def schema(recipe: str) -> type[RecipeConfig]:
    module = importlib.import_module(f"recipes.{recipe}")
    return next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, RecipeConfig)
                and v is not RecipeConfig and v.__module__ == module.__name__)


def _sections(cls: type, seen: dict) -> dict[str, type]:
    if cls.__name__ in seen:
        return seen
    seen[cls.__name__] = cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls).get(f.name, f.type)
        for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
            if dataclasses.is_dataclass(arg):
                _sections(arg, seen)
    return seen


def walked_fields() -> set[str]:
    """``Section.field`` of every init field of every section of every recipe schema; fields whose type
    admits a single value (``Literal[4]``) have nothing else to set and are left out."""
    seen: dict[str, type] = {}
    for recipe in RECIPES:
        _sections(schema(recipe), seen)
    out = set()
    for name, cls in seen.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints.get(f.name)
            if f.init and not (typing.get_origin(tp) is typing.Literal and len(typing.get_args(tp)) == 1):
                out.add(f"{'RecipeConfig' if f.name in {g.name for g in dataclasses.fields(RecipeConfig)} else name}.{f.name}")
    return out


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, tmp: Path, monkeypatch):
        self.tmp, self.mp = tmp, monkeypatch
        self.rows = tmp / "rows.jsonl"
        self.rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def base(self, recipe: str) -> dict:
        out = str(self.tmp / "out")
        cfg = {"model": {"name_or_path": MODEL, "dtype": "float32"},
               "data": {"path": str(self.rows), "eval_split": "test"},
               "eval": {"max_rows": 4, "batch_size": 4, "max_new_tokens": 2, "sampled": False, "before_training": False},
               "trainer": {"output_dir": out, "report_to": [], "max_steps": 1}}
        extra = {
            "rlif": {"rewards": [{"name": "math_accuracy"}],
                     "trainer": {"per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 4}},
            "alol": {"rewards": [{"name": "math_accuracy"}], "value_rows": 4},
            "decred": {"decred": {"layers": [1]}},
            "self_improve": {"rewards": [{"name": "majority_vote"}], "improve": {"num_samples": 2, "max_new_tokens": 2,
                                                                                 "iterations": 1}},
            "evaluate": {"output_dir": out},
        }.get(recipe, {})
        if recipe == "zoo":  # the zoo's one method is an RLIF config file
            extra = {"output_dir": out,
                     "zoo": {"seeds": [0], "methods": [{"name": "m", "config": self.method_config()}]}}
        return OmegaConf.to_container(OmegaConf.merge(cfg, extra))

    def method_config(self) -> str:
        """An RLIF config file (the zoo's method)."""
        path = self.tmp / "method.yaml"
        OmegaConf.save(OmegaConf.create(self.base("rlif")), path)
        return str(path)

    def config(self, recipe: str, *overrides: str, base: dict | None = None):
        path = self.tmp / f"{recipe}.yaml"
        OmegaConf.save(OmegaConf.create(base or self.base(recipe)), path)
        return load_config(schema(recipe), path, list(overrides))

    def stop_at(self, recipe: str, name: str, module: str | None = None) -> None:
        """Replace ``name`` in the recipe's module (or ``module``) by a recorder that stops the run."""
        def recorder(*args, **kwargs):
            raise Built(*args, **kwargs)
        self.mp.setattr(importlib.import_module(module or f"recipes.{recipe}"), name, recorder)

    def spy(self, module: str, name: str) -> list:
        """Calls of ``module.name`` (args, kwargs, result) while it still runs."""
        calls: list = []
        target = importlib.import_module(module)
        real = getattr(target, name)

        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append((args, kwargs, result))
            return result
        self.mp.setattr(target, name, wrapper)
        return calls

    def build(self, recipe: str, *overrides: str, stop: str | None = None, module: str | None = None,
              cfg=None) -> Built:
        stop = stop or {"rlif": "RLIFTrainer", "sft": "SFTTrainer", "alol": "ALoLTrainer", "decred": "DeCREDSFTTrainer",
                        "self_improve": "score_round"}[recipe]
        if recipe == "self_improve" and stop == "score_round":
            module = module or "recipes.common.rounds"
        self.stop_at(recipe, stop, module)
        cfg = cfg if cfg is not None else self.config(recipe, *overrides)
        with pytest.raises(Built) as built:
            importlib.import_module(f"recipes.{recipe}").run(cfg)
        return built.value

    def refused(self, recipe: str, *overrides: str, key: str) -> None:
        with pytest.raises(ConfigError) as err:
            cfg = self.config(recipe, *overrides)
            importlib.import_module(f"recipes.{recipe}").run(cfg)
        assert err.value.key == key, str(err.value)


@pytest.fixture
def h(tmp_path, monkeypatch, tiny_cache):
    return Harness(tmp_path, monkeypatch)


def _args(b: Built):
    return b.kwargs["args"]


def _adapter_dir(h: Harness) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recipes.common.tiny import resolve_tiny_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_tiny_model(MODEL)),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    path = h.tmp / "adapter"
    model.save_pretrained(path)
    return path


def _pretend_gpu(h: Harness) -> None:
    """``quantization_config`` as on a GPU machine (CUDA and bitsandbytes reported present): only
    the BitsAndBytesConfig is built here, no weights are quantized."""
    h.mp.setattr(torch.cuda, "is_available", lambda: True)
    h.mp.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))


def _quantized(h: Harness, **fields):
    from recipes.common.schema import QuantizationSection

    cfg = h.config("rlif", "peft={r: 2}", "trainer.bf16=false", "trainer.use_cpu=true")
    cfg.model.quantization = QuantizationSection(**fields)  # validated above without it: CPU refuses 4-bit
    _pretend_gpu(h)
    return h.build("rlif", cfg=cfg).kwargs["quantization_config"]


# --------------------------------------------------------------------------------------------
# Probes: one per field
# --------------------------------------------------------------------------------------------


def p_model_name(h):
    from recipes.common.tiny import resolve_tiny_model

    other = "tiny://llama?layers=2&hidden=64&intermediate=256"
    assert h.build("rlif", f"model.name_or_path={other}").kwargs["model"] == resolve_tiny_model(other)
    assert h.build("sft", f"model.name_or_path={other}").kwargs["model"].config.model_type == "llama"


def p_model_dtype(h):
    assert _args(h.build("rlif", "model.dtype=bfloat16")).model_init_kwargs["dtype"] == torch.bfloat16
    assert h.build("sft", "model.dtype=bfloat16").kwargs["model"].dtype == torch.bfloat16


def p_model_attn(h):
    assert _args(h.build("rlif", "model.attn_implementation=eager")).model_init_kwargs["attn_implementation"] == "eager"
    assert h.build("sft", "model.attn_implementation=eager").kwargs["model"].config._attn_implementation == "eager"


def p_model_revision(h):
    assert _args(h.build("rlif", "model.revision=v2")).model_init_kwargs["revision"] == "v2"


def p_model_trust(h):
    assert _args(h.build("rlif", "model.trust_remote_code=true")).model_init_kwargs["trust_remote_code"] is True


def p_model_quantization(h):
    with pytest.raises(ConfigError) as err:  # this machine has no GPU: refused in one line
        h.config("rlif", "model.quantization={bits: 4}", "peft={r: 2}")
    assert err.value.key == "model.quantization" and "CUDA GPU" in str(err.value)
    _pretend_gpu(h)
    h.mp.setattr("trainers.distributed.no_accelerator", lambda: False)
    with pytest.raises(ConfigError) as err:  # 4-bit weights with nothing trainable on top
        h.config("rlif", "model.quantization={bits: 4}", "trainer.use_cpu=true", "trainer.bf16=false")
    assert err.value.key == "model.quantization" and "peft" in str(err.value)
    assert _quantized(h).load_in_4bit


def p_quant_type(h):
    assert _quantized(h, quant_type="fp4").bnb_4bit_quant_type == "fp4"


def p_quant_compute(h):
    assert _quantized(h, compute_dtype="float16").bnb_4bit_compute_dtype == torch.float16


def p_quant_double(h):
    assert _quantized(h, double_quant=False).bnb_4bit_use_double_quant is False


def p_model_adapter(h):
    from peft import PeftModel

    adapter = _adapter_dir(h)
    for recipe in ("rlif", "sft"):
        built = h.build(recipe, f"model.adapter={adapter}").kwargs
        model = built["model"]
        assert isinstance(model, PeftModel) and built.get("peft_config") is None
        lora = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora and all(p.requires_grad for p in lora) and any(p.abs().sum() > 0 for p in lora)
    h.refused("self_improve", f"model.adapter={adapter}", key="model.adapter")


def _lora(h, override):
    configs = [h.build(recipe, override).kwargs["peft_config"] for recipe in ("rlif", "sft")]
    return configs


def p_peft_r(h):
    assert all(c.r == 3 for c in _lora(h, "peft={r: 3}"))


def p_peft_alpha(h):
    assert all(c.lora_alpha == 7 for c in _lora(h, "peft={alpha: 7}"))


def p_peft_dropout(h):
    assert all(c.lora_dropout == 0.2 for c in _lora(h, "peft={dropout: 0.2}"))


def p_peft_targets(h):
    assert all(set(c.target_modules) == {"q_proj"} for c in _lora(h, "peft={target_modules: [q_proj]}"))


def p_recipe_peft(h):
    p_peft_r(h)
    h.refused("evaluate", "peft={r: 2}", key="peft")


def _train(h, *overrides, recipe="rlif"):
    return h.build(recipe, *overrides).kwargs["train_dataset"]


def p_data_path(h):
    other = h.tmp / "other.jsonl"
    other.write_text(json.dumps({"question": "9*9=", "answer": "81"}) + "\n")
    assert _train(h, f"data.path={other}")["question"] == ["9*9="]


def _hub(h) -> list:
    """Hub loading recorded (offline here): ``load_dataset``'s arguments; it returns the local rows."""
    from datasets import Dataset

    from recipes.common import data

    calls, real = [], data.load_dataset

    def fake(path, name=None, split=None, revision=None, data_dir=None, **kwargs):
        if kwargs:  # a local file's builder (json, csv, ...)
            return real(path, name, split=split, revision=revision, data_dir=data_dir, **kwargs)
        calls.append({"path": path, "name": name, "split": split, "revision": revision, "data_dir": data_dir})
        if path == "someone/missing":
            raise ConnectionError("offline")
        return Dataset.from_list(ROWS)
    h.mp.setattr("recipes.common.data.load_dataset", fake)
    return calls


def p_data_name(h):
    calls = _hub(h)
    _train(h, "data.path=someone/data", "data.name=algebra")
    assert calls[0]["name"] == "algebra"


def p_data_revision(h):
    calls = _hub(h)
    _train(h, "data.path=someone/data", "data.revision=abc123")
    assert calls[0]["revision"] == "abc123"


def p_data_dir(h):
    calls = _hub(h)
    _train(h, "data.path=someone/data", "data.data_dir=helpful-base")
    assert calls[0]["data_dir"] == "helpful-base"


def p_data_split(h):
    calls = _hub(h)
    _train(h, "data.path=someone/data", "data.split=dev")
    assert calls[0]["split"] == "dev"


def p_data_eval_split(h):
    calls = _hub(h)
    _train(h, "data.path=someone/data", "data.eval_split=validation")
    assert [c["split"] for c in calls] == ["train", "validation"]


def p_data_fallback(h):
    _hub(h)
    assert len(_train(h, "data.path=someone/missing", f"data.fallback={h.rows}")) == len(ROWS)


GPQA = ("data.path=tiny://gpqa", "data.columns={question: Question}", "data.prompt='{question} A) {A} B) {B}'")
GPQA_WRONG = "[Incorrect Answer 1, Incorrect Answer 2, Incorrect Answer 3]"


def _choices(h, choices: str):
    return _train(h, *GPQA, f"data.choices={choices}")


def p_data_choices(h):
    rows = _choices(h, f"{{correct: Correct Answer, incorrect: {GPQA_WRONG}}}")
    assert {"A", "B", "C", "D"} <= set(rows.column_names) and set(rows["answer"]) == set("ABCD")


def p_choices_correct(h):
    from recipes.common.tiny.choice import QUESTIONS

    rows = _choices(h, "{correct: Incorrect Answer 1, incorrect: [Correct Answer, Incorrect Answer 2, Incorrect Answer 3]}")
    assert rows[0][rows[0]["answer"]] == QUESTIONS[0][2][0]


def p_choices_incorrect(h):
    rows = _choices(h, "{correct: Correct Answer, incorrect: [Incorrect Answer 1]}")
    assert "C" not in rows.column_names and set(rows["answer"]) == {"A", "B"}


def p_choices_seed(h):
    seeded = [_choices(h, f"{{correct: Correct Answer, incorrect: {GPQA_WRONG}, seed: {s}}}")["answer"] for s in (0, 1)]
    assert seeded[0] != seeded[1]


def p_data_columns(h):
    assert _train(h, "data.columns={question: problem}")["question"][0] == "1 plus 1"


def p_data_prompt(h):
    assert _train(h, "data.prompt='Q: {question}'")["prompt"][0] == "Q: 1+1="


def p_data_system(h):
    prompt = _train(h, "data.system_prompt='Be brief.'")["prompt"][0]
    assert prompt[0] == {"role": "system", "content": "Be brief."}


def p_data_conversational(h):
    assert _train(h, "data.conversational=true")["prompt"][0] == [{"role": "user", "content": "1+1="}]


def p_data_max_rows(h):
    assert len(_train(h, "data.max_rows=3")) == 3


def p_data_split_on(h):
    assert _train(h, "data.split_on='+'", recipe="sft")["completion"][0] == "1="


def _evaluate(h, *overrides) -> tuple[dict, list, list]:
    """``evaluate_model`` as every recipe calls it (the ``eval:`` section passed whole), with its
    generation and signal reading recorded."""
    from recipes.common.data import load_split
    from recipes.common.evaluation import evaluate_model
    from recipes.common.modeling import load_model, load_tokenizer

    cfg = h.config("rlif", *overrides)
    gen = h.spy("recipes.common.evaluation", "generate")
    signals = h.spy("recipes.common.evaluation", "internal_signals")
    test = load_split(cfg.data, "test", cfg.eval.max_rows)
    report = evaluate_model(load_model(cfg.model), load_tokenizer(cfg.model), test, cfg.eval)
    return report, [c[1] for c in gen], [c[1] for c in signals]


def p_eval_max_rows(h):
    from recipes.common.training import held_out

    assert len(held_out(h.config("rlif", "eval.max_rows=3"))) == 3


def p_eval_batch(h):
    assert _evaluate(h, "eval.batch_size=3")[1][0]["batch_size"] == 3


def p_eval_tokens(h):
    assert _evaluate(h, "eval.max_new_tokens=3")[1][0]["max_new_tokens"] == 3


def p_eval_greedy(h):
    report, _, _ = _evaluate(h, "eval.greedy=false", "eval.sampled=true")
    assert "greedy_accuracy" not in report and "sampled_accuracy" in report


def p_eval_sampled(h):
    assert "sampled_accuracy" in _evaluate(h, "eval.sampled=true")[0]


def p_eval_temperature(h):
    assert _evaluate(h, "eval.sampled=true", "eval.temperature=0.5")[1][1]["temperature"] == 0.5


def p_eval_top_p(h):
    assert _evaluate(h, "eval.sampled=true", "eval.top_p=0.5")[1][1]["top_p"] == 0.5


def p_eval_num_samples(h):
    report, gen, _ = _evaluate(h, "eval.sampled=true", "eval.num_samples=3")
    assert gen[1]["num_return_sequences"] == 3 and "pass@3" in report


def p_eval_pass_k(h):
    report, _, _ = _evaluate(h, "eval.sampled=true", "eval.num_samples=3", "eval.pass_k=[2]")
    assert "pass@2" in report and "pass@1" not in report


def p_eval_sc(h):
    report, _, signals = _evaluate(h, "eval.sampled=true", "eval.self_certainty=true")
    assert "sc_auc" in report and signals[0]["certainty"]


def p_eval_ne(h):
    report, _, signals = _evaluate(h, "eval.sampled=true", "eval.negative_entropy=true")
    assert "ne_auc" in report and signals[0]["entropy"]


def p_eval_ic(h):
    report, _, signals = _evaluate(h, "eval.sampled=true", "eval.internal_consistency=true")
    assert "ic_auc" in report and signals[0]["consistency"] is not None


def p_eval_ic_mode(h):
    _, _, signals = _evaluate(h, "eval.sampled=true", "eval.internal_consistency=true", "eval.ic_mode=soft")
    assert signals[0]["consistency"].mode == "soft"


def p_eval_ic_layers(h):
    _, _, signals = _evaluate(h, "eval.sampled=true", "eval.internal_consistency=true", "eval.ic_layers=[1]")
    assert signals[0]["consistency"].layers == [1]


def p_eval_clue(h):
    report, _, signals = _evaluate(h, "eval.sampled=true", "eval.num_samples=2", "eval.clue=true")
    assert {"clue_auc", "clue_selected_accuracy"} <= set(report) and signals[0]["clue"]
    with pytest.raises(ConfigError, match="eval.clue"):
        h.config("rlif", "eval.clue=maybe")


def p_eval_seed(h):
    seeds = []
    real = torch.manual_seed
    h.mp.setattr(torch, "manual_seed", lambda s: (seeds.append(s), real(s))[1])
    _evaluate(h, "eval.sampled=true", "eval.seed=77")
    assert 77 in seeds


def p_eval_grader(h):
    with pytest.raises(ValueError, match="eval.grader=code needs column"):  # the code grader reads `tests`
        _evaluate(h, "eval.grader=code")


def p_eval_code_timeout(h):
    from datasets import Dataset

    import rewards.sandbox as sandbox
    from recipes.common.evaluation import code_grading

    made = []
    h.mp.setattr(sandbox, "LocalSandbox", lambda **kwargs: made.append(kwargs))
    code_grading(Dataset.from_list([{"prompt": "p", "tests": "[]"}]), h.config("rlif", "eval.grader=code",
                                                                             "eval.code_timeout=3.5").eval)
    assert made == [{"timeout": 3.5}]


def p_eval_backend(h):
    """``vllm``: generation goes to a vllm.LLM (a stand-in module here) built from the model's directory."""
    from recipes.common.tiny import resolve_tiny_model
    from tests.fake_vllm import fake_vllm_module

    fake = fake_vllm_module([5, 6], "11")
    h.mp.setitem(sys.modules, "vllm", fake)
    h.mp.setattr("recipes.common.evaluation.generate", lambda *a, **k: pytest.fail("transformers generate was called"))
    _evaluate_recipe(h, "eval.backend=vllm")
    assert [e.init_kwargs["model"] for e in fake.engines] == [resolve_tiny_model(MODEL)]
    assert fake.engines[0].calls


def p_eval_before(h):
    """``before_training``: the recipes' shared train-and-evaluate evaluates the starting model."""
    from recipes.common import training

    descs = []
    h.mp.setattr(training, "evaluate_model", lambda *a, **k: descs.append(k.get("desc")) or {"rows": 1})

    class FakeTrainer:
        args = types.SimpleNamespace(output_dir=str(h.tmp / "out"), resume_from_checkpoint=None, world_size=1)
        model, accelerator = None, types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                                         device=None)
        state = types.SimpleNamespace(save_to_json=lambda path: None)

        def is_world_process_zero(self):
            return True

        def train(self, resume_from_checkpoint=None):
            pass

        def save_model(self, path):
            pass

    for flag, expected in (("true", ["before", "after"]), ("false", ["after"])):
        descs.clear()
        training.train_and_evaluate(h.config("sft", f"eval.before_training={flag}"), FakeTrainer(), None, [{}])
        assert descs == expected


def p_reward_name(h):
    from rewards import NegativeEntropy

    funcs = h.build("rlif", "rewards=[{name: negative_entropy}]").kwargs["reward_funcs"]
    assert isinstance(funcs[0], NegativeEntropy)


def p_reward_weight(h):
    assert _args(h.build("rlif", "rewards=[{name: math_accuracy, weight: 0.25}]")).reward_weights == [0.25]


def p_reward_kwargs(h):
    funcs = h.build("rlif", "rewards=[{name: internal_consistency, kwargs: {mode: soft, layers: [1]}}]").kwargs["reward_funcs"]
    assert funcs[0].mode == "soft" and funcs[0].layers == [1]


def p_reward_transform(h):
    from rewards import TransformedReward

    funcs = h.build("rlif", "rewards=[{name: self_certainty, transform: {clip: [0, 1], scale: 2}}]").kwargs["reward_funcs"]
    assert isinstance(funcs[0], TransformedReward) and funcs[0].transform == {"clip": (0.0, 1.0), "scale": 2.0, "shift": 0.0}
    assert funcs[0].__name__ == "self_certainty" and funcs[0].signals == ("self_certainty",)


def p_eval_pc(h):
    report, _, signals = _evaluate(h, "eval.sampled=true", "eval.num_samples=2", "eval.perplexity_consistency=true")
    assert "pc_auc" in report and "pc_vote_accuracy" in report and signals[0]["logps"]


def p_rlif_rewards(h):
    p_reward_name(h)


def p_rlif_log_accuracy(h):
    from rewards import MathAccuracy

    on = h.build("rlif", "rewards=[{name: self_certainty}]").kwargs["reward_funcs"]
    off = h.build("rlif", "rewards=[{name: self_certainty}]", "log_accuracy=false").kwargs["reward_funcs"]
    assert any(isinstance(f, MathAccuracy) for f in on) and not any(isinstance(f, MathAccuracy) for f in off)


def p_rlif_eval_data(h):
    other = h.tmp / "eval_rows.jsonl"
    other.write_text("".join(json.dumps({"question": f"{a}*3=", "answer": str(3 * a)}) + "\n" for a in range(1, 6)))
    test = h.build("rlif", f"eval_data={{path: {other}, split: train}}", stop="train_and_evaluate").args[3]
    assert list(test["question"]) == [f"{a}*3=" for a in range(1, 5)]  # eval.max_rows=4 rows of eval_data


def p_recipe_model(h):
    p_model_name(h)


def p_recipe_data(h):
    p_data_path(h)


def p_recipe_eval(h):
    p_eval_batch(h)


def p_recipe_trainer(h):
    assert _args(h.build("rlif", "trainer.learning_rate=3e-4")).learning_rate == 3e-4
    assert _args(h.build("sft", "trainer.learning_rate=3e-4")).learning_rate == 3e-4


def p_recipe_description(h):
    """``description`` is what ``python -m recipes list`` shows, and is saved with the run."""
    from recipes.common.config import save_config

    path = save_config(h.config("sft", "description='my run'"), h.tmp / "saved")
    assert OmegaConf.load(path).description == "my run"


def p_recipe_launch(h):
    """``launch`` documents the accelerate config the run is meant for; saved with the run."""
    from recipes.common.config import save_config

    path = save_config(h.config("sft", "launch=launch/accelerate/ddp.yaml"), h.tmp / "saved")
    assert OmegaConf.load(path).launch == "launch/accelerate/ddp.yaml"


def p_recipe_vars(h):
    base = h.base("sft")
    base["vars"], base["trainer"]["learning_rate"] = {"lr": 0.5}, "${vars.lr}"
    assert h.config("sft", "vars.lr=0.125", base=base).trainer.learning_rate == 0.125


def p_recipe_source(h):
    with pytest.raises(ConfigError) as err:
        h.config("sft", "data.max_rows=0")
    assert err.value.source == "command line" and h.config("sft").source.endswith("sft.yaml")


def _alol(h, *overrides):
    return h.build("alol", *overrides)


def p_alol_rewards(h):
    assert _alol(h, "rewards=[{name: math_accuracy, weight: 0.5}]").kwargs["reward_weights"] == [0.5]


def p_alol_eval_rewards(h):
    calls = h.spy("recipes.alol", "_rewards")
    _alol(h, "eval_rewards=[{name: format}]")
    assert [s.name for s in calls[-1][0][0]] == ["format"]


def p_alol_value_split(h):
    assert _alol(h, "value_split=null").kwargs["value_dataset"] is None
    assert _alol(h).kwargs["value_dataset"] is not None


def p_alol_value_rows(h):
    assert len(_alol(h, "value_rows=3").kwargs["value_dataset"]) == 3


def p_alol_eval_sets(h):
    calls = h.spy("recipes.alol", "eval_data")
    _alol(h, "eval_sets={mine: {eval_split: dev}}")
    assert list(calls[0][2]) == ["mine"]


def p_alol_variants(h):
    built = _alol(h, "variants=[wbc, nll]")
    assert _args(built).variant == "wbc" and _args(built).output_dir.endswith("/wbc")
    h.refused("alol", "variants=[nope]", key="variants")


def _decred(h, field, value) -> object:
    return h.build("decred", f"decred.{field}={value}").kwargs["decred"]


DECRED_VALUES = {"layers": ("[1]", [1]), "head": ("shared", "shared"), "init": ("random", "random"),
                 "final_norm": ("true", True), "weights": ("[0.25, 0.75]", [0.25, 0.75]), "scale": ("sqrt_l", "sqrt_l"),
                 "curriculum": ("round_robin", "round_robin"), "rotation": ("3", 3), "label_smoothing": ("0.1", 0.1),
                 "chunk_size": ("7", 7), "ctc_blank": ("3", 3), "detach": ("true", True), "export_heads": ("false", False),
                 "decode_weights": ("[0.5, 0.5]", [0.5, 0.5])}


def p_decred_option(field):
    def probe(h):
        if field == "ctc_weight":  # the CTC head needs a speech encoder: refused on a text model
            h.refused("decred", "decred.ctc_weight=0.5", key="decred.ctc_weight")
            return
        text, value = DECRED_VALUES[field]
        assert getattr(_decred(h, field, text), field) == value
    return probe


def p_decred_section(h):
    assert _decred(h, "label_smoothing", "0.1").label_smoothing == 0.1


def p_decred_compare(h):
    from recipes import decred

    options = []

    class Recorder:
        def __init__(self, **kwargs):
            options.append(kwargs["decred"])

        def is_world_process_zero(self):
            return False
    h.mp.setattr(decred, "DeCREDSFTTrainer", Recorder)
    h.mp.setattr(decred, "train_and_evaluate", lambda *a, **k: {})
    decred.run(h.config("decred", "compare_baseline=true"))
    assert [o.detach for o in options] == [False, True]


def p_decred_head_rows(h):
    from recipes import decred
    from recipes.common.modeling import load_model, load_tokenizer
    from recipes.common.training import held_out

    cfg = h.config("decred", "head_eval_rows=3", "eval.max_rows=null")
    seen = []
    h.mp.setattr(decred, "evaluate_heads", lambda model, batches, options, **k: seen.extend(batches) or {})
    trainer = types.SimpleNamespace(decred_options=cfg.decred)
    decred._evaluate_heads_of(cfg, trainer, load_model(cfg.model), load_tokenizer(cfg.model, "right"), held_out(cfg))
    assert sum(len(b["input_ids"]) for b in seen) == 3


def p_decred_target_length(h):
    built = h.build("decred", "model.name_or_path=tiny://t5?layers=2&hidden=64&intermediate=256",
                    "max_target_length=1", stop="DeCREDSeq2SeqTrainer")
    assert max(len(x) for x in built.kwargs["train_dataset"]["labels"]) == 1


SPEECH = ("model.name_or_path=scratch", "model.dtype=auto")  # a speech model is built from its section


def p_decred_speech(h):
    built = h.build("decred", *SPEECH, "speech={bpe_vocab: 77}", stop="speech_data")
    assert built.args[0].speech.bpe_vocab == 77
    for option in ("model.dtype=bfloat16", "model.revision=v2", "peft={r: 2}"):  # nothing loads model.* for speech
        h.refused("decred", *SPEECH, "speech={bpe_vocab: 77}", option, key=option.split("=")[0])


SPEECH_VALUES = {"encoder": "{hidden_size: 32}", "decoder": "{hidden_size: 32}", "tokenizer": "some/tokenizer",
                 "bpe_vocab": "77", "audio_column": "wav", "text_column": "words", "sampling_rate": "8000",
                 "max_target_length": "9", "lowercase": "true", "eval_max_new_tokens": "5", "seed": "4",
                 "mask_unks": "true", "decoder_pos_emb_fixed": "true"}  # their effects: tests/test_decred.py


def p_speech_option(field):
    def probe(h):
        built = h.build("decred", *SPEECH, f"speech={{{field}: {SPEECH_VALUES[field]}}}",
                        stop="speech_data")
        value = getattr(built.args[0].speech, field)
        expected = yaml.safe_load(SPEECH_VALUES[field])
        assert value == expected
    return probe


IMPROVE_VALUES = {"iterations": ("2", 2), "num_samples": ("3", 3), "temperature": ("0.5", 0.5), "top_p": ("0.9", 0.9),
                  "max_new_tokens": ("3", 3), "batch_size": ("5", 5), "selection": ("top_k", "top_k"),
                  "top_k": ("2", 2), "threshold": ("0.5", 0.5), "min_share": ("0.5", 0.5),
                  "prompts_per_round": ("2", 2), "start_from": ("base", "base"), "ds_keep_fraction": ("0.5", 0.5)}


def p_improve_option(field):
    def probe(h):
        if field == "ds_valid_rows":  # the DS valid rows come off the prompts: they reach the sampler as `valid`
            built = h.build("self_improve", "improve.ds_valid_rows=1")
            assert len(built.args[6]) == 1 and len(built.args[3]) == len(ROWS) - 1
            return
        text, value = IMPROVE_VALUES[field]
        assert getattr(h.build("self_improve", f"improve.{field}={text}").args[5], field) == value
    return probe


def p_improve_section(h):
    p_improve_option("num_samples")(h)


def p_si_rewards(h):
    calls = h.spy("recipes.common.rounds", "build_verifier")
    h.build("self_improve", "rewards=[{name: self_certainty, weight: 0.5}]")
    assert calls[0][2].weights == [0.5]


def p_si_instructions(h):
    calls = h.spy("recipes.self_improve", "load_split")
    h.build("self_improve", f"instructions={{path: '{h.rows}', max_rows: 2}}")
    assert any(len(c[2]) == 2 for c in calls)


def _evaluate_recipe(h, *overrides) -> dict:
    from recipes import evaluate

    return evaluate.run(h.config("evaluate", *overrides))


def p_ev_compare(h):
    reports = _evaluate_recipe(h, "compare={other: 'tiny://llama?layers=2&hidden=64&intermediate=256'}")
    assert set(reports) == {"other", "model"}


def p_ev_label(h):
    assert set(_evaluate_recipe(h, "label=mine")) == {"mine"}


def p_ev_output_dir(h):
    _evaluate_recipe(h, f"output_dir={h.tmp / 'elsewhere'}")
    assert (h.tmp / "elsewhere" / "eval.json").is_file()


def _zoo_cells(h, *overrides: str, method: dict | None = None, methods: list | None = None):
    from recipes import zoo

    base = h.base("zoo")
    if method is not None:
        base["zoo"]["methods"][0].update(method)
    if methods is not None:
        base["zoo"]["methods"] = methods
    return zoo.plan(h.config("zoo", *overrides, base=base))


def _trained(cells):
    return [c for c in cells if c.recipe is not None]


def p_zoo_section(h):
    assert [(c.method, c.seed) for c in _zoo_cells(h, "zoo.seeds=[4]")] == [("base", 4), ("m", 4)]


def p_zoo_compact(h):
    from recipes import zoo

    base = {**h.base("zoo"), "compact": ["zoo.seeds=[7]", f"output_dir={h.tmp / 'small'}"]}
    path = h.tmp / "zoo.yaml"
    OmegaConf.save(OmegaConf.create(base), path)
    cfg, cells, args = zoo.configure(["--config", str(path), "--compact"])
    assert args.compact and {c.seed for c in cells} == {7} and cfg.output_dir == str(h.tmp / "small")
    assert {c.seed for c in zoo.configure(["--config", str(path)])[1]} == {0}


def p_zoo_output_dir(h):
    cells = _zoo_cells(h, f"output_dir={h.tmp / 'there'}")
    assert all(Path(c.path).is_relative_to(h.tmp / "there" / "cells") for c in cells)
    assert _trained(cells)[0].config.trainer.output_dir == str(h.tmp / "there" / "runs" / "m" / "seed0")


def p_zoo_methods(h):
    two = [{"name": "a", "config": h.method_config()}, {"name": "b", "config": h.method_config()}]
    assert [c.method for c in _zoo_cells(h, methods=two)] == ["base", "a", "b"]


def p_zoo_seeds(h):
    assert {c.seed for c in _zoo_cells(h, "zoo.seeds=[1,2]")} == {1, 2}


def p_zoo_budget(h):
    cells = _trained(_zoo_cells(h, "zoo.budget=[trainer.max_steps=7,trainer.learning_rate=0.25]"))
    assert cells[0].config.trainer.max_steps == 7 and cells[0].config.trainer.learning_rate == 0.25


def p_zoo_only(h):
    two = [{"name": "a", "config": h.method_config()}, {"name": "b", "config": h.method_config()}]
    assert [c.method for c in _zoo_cells(h, "zoo.only=[b]", methods=two)] == ["base", "b"]
    with pytest.raises(ConfigError) as err:
        _zoo_cells(h, "zoo.only=[c]", methods=two)
    assert err.value.key == "zoo.only"


def p_zoo_cache(h):
    assert all(Path(c.path).is_relative_to(h.tmp / "cache") for c in _zoo_cells(h, f"zoo.cache={h.tmp / 'cache'}"))


def p_zoo_base_label(h):
    assert [c.method for c in _zoo_cells(h, "zoo.base_label=''")] == ["m"]
    assert _zoo_cells(h, "zoo.base_label=start")[0].label == "start"


def p_zoo_method_name(h):
    assert _trained(_zoo_cells(h, method={"name": "other"}))[0].method == "other"


def p_zoo_method_config(h):
    assert _trained(_zoo_cells(h))[0].config.source == h.method_config()
    with pytest.raises(ConfigError) as err:  # the only method's file is missing: skipped, then nothing is left
        _zoo_cells(h, method={"config": str(h.tmp / "absent.yaml")})
    assert err.value.key == "zoo.methods"


def p_zoo_method_recipe(h):
    assert _trained(_zoo_cells(h, method={"recipe": "intuitor"}))[0].recipe == "intuitor"
    with pytest.raises(ConfigError) as err:
        _zoo_cells(h, method={"recipe": "evaluate"})
    assert err.value.key == "zoo.methods[0].recipe"


def p_zoo_method_label(h):
    assert _trained(_zoo_cells(h, method={"label": "Mine"}))[0].label == "Mine"


def p_zoo_method_budget(h):
    cells = _trained(_zoo_cells(h, "zoo.budget=[trainer.max_steps=7]", method={"budget": False}))
    assert cells[0].config.trainer.max_steps == 1


def p_zoo_method_overrides(h):
    cells = _trained(_zoo_cells(h, "zoo.budget=[trainer.max_steps=7]", method={"overrides": ["trainer.max_steps=9"]}))
    assert cells[0].config.trainer.max_steps == 9


def p_zoo_method_trained(h):
    assert _trained(_zoo_cells(h, method={"trained": "round_1/model"}))[0].trained == "round_1/model"
def _periodic(h, *overrides) -> tuple[list, list]:
    """The callbacks the recipes' shared train-and-evaluate adds to a (fake) trainer, and the held-out
    rows each of their evaluations reads."""
    from datasets import Dataset

    from recipes.common import training

    rows_read, added = [], []
    h.mp.setattr(training, "evaluate_model", lambda model, tok, data, *a, **k: rows_read.append(len(data)) or {"rows": 1})

    class FakeTrainer:
        args = types.SimpleNamespace(output_dir=str(h.tmp / "out"), resume_from_checkpoint=None, world_size=1)
        model, accelerator = None, types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                                         device=None)
        state = types.SimpleNamespace(save_to_json=lambda path: None, global_step=0)

        def is_world_process_zero(self):
            return True

        def add_callback(self, callback):
            added.append(callback)

        def train(self, resume_from_checkpoint=None):
            for callback in added:
                callback.evaluate(None)

        def save_model(self, path):
            pass

    training.train_and_evaluate(h.config("sft", *overrides), FakeTrainer(), None,
                                Dataset.from_list([{"prompt": str(i), "answer": str(i)} for i in range(5)]))
    return added, rows_read


def p_eval_every_steps(h):
    from recipes.common.periodic_eval import EvaluateEverySteps

    added, _ = _periodic(h, "eval.every_steps=3")
    assert [type(c) for c in added] == [EvaluateEverySteps] and added[0].every_steps == 3
    assert _periodic(h)[0] == []  # null: no evaluation during training
    h.refused("decred", "eval.every_steps=3", key="eval.every_steps")  # a recipe that cannot: one config line


def p_eval_every_rows(h):
    assert _periodic(h, "eval.every_steps=3", "eval.every_rows=2")[1] == [2, 5]  # during training: 2; after: all
    assert _periodic(h, "eval.every_steps=3")[1] == [5, 5]


PROBES = {
    "RecipeConfig.model": p_recipe_model, "RecipeConfig.data": p_recipe_data, "RecipeConfig.eval": p_recipe_eval,
    "RecipeConfig.peft": p_recipe_peft, "RecipeConfig.trainer": p_recipe_trainer,
    "RecipeConfig.description": p_recipe_description, "RecipeConfig.launch": p_recipe_launch,
    "RecipeConfig.vars": p_recipe_vars, "RecipeConfig.source": p_recipe_source,
    "ModelConfig.name_or_path": p_model_name, "ModelConfig.dtype": p_model_dtype,
    "ModelConfig.attn_implementation": p_model_attn, "ModelConfig.revision": p_model_revision,
    "ModelConfig.trust_remote_code": p_model_trust, "ModelConfig.quantization": p_model_quantization,
    "ModelConfig.adapter": p_model_adapter,
    "QuantizationSection.quant_type": p_quant_type, "QuantizationSection.compute_dtype": p_quant_compute,
    "QuantizationSection.double_quant": p_quant_double,
    "LoraConfigSection.r": p_peft_r, "LoraConfigSection.alpha": p_peft_alpha, "LoraConfigSection.dropout": p_peft_dropout,
    "LoraConfigSection.target_modules": p_peft_targets,
    "DataConfig.path": p_data_path, "DataConfig.name": p_data_name, "DataConfig.split": p_data_split,
    "DataConfig.eval_split": p_data_eval_split, "DataConfig.columns": p_data_columns, "DataConfig.prompt": p_data_prompt,
    "DataConfig.system_prompt": p_data_system, "DataConfig.conversational": p_data_conversational,
    "DataConfig.max_rows": p_data_max_rows, "DataConfig.revision": p_data_revision, "DataConfig.fallback": p_data_fallback,
    "DataConfig.data_dir": p_data_dir, "DataConfig.split_on": p_data_split_on, "DataConfig.choices": p_data_choices,
    "ChoicesSection.correct": p_choices_correct, "ChoicesSection.incorrect": p_choices_incorrect,
    "ChoicesSection.seed": p_choices_seed,
    "EvalConfig.max_rows": p_eval_max_rows, "EvalConfig.batch_size": p_eval_batch, "EvalConfig.max_new_tokens": p_eval_tokens,
    "EvalConfig.grader": p_eval_grader, "EvalConfig.code_timeout": p_eval_code_timeout, "EvalConfig.backend": p_eval_backend,
    "EvalConfig.greedy": p_eval_greedy, "EvalConfig.sampled": p_eval_sampled, "EvalConfig.temperature": p_eval_temperature,
    "EvalConfig.top_p": p_eval_top_p, "EvalConfig.num_samples": p_eval_num_samples, "EvalConfig.pass_k": p_eval_pass_k,
    "EvalConfig.self_certainty": p_eval_sc, "EvalConfig.negative_entropy": p_eval_ne,
    "EvalConfig.internal_consistency": p_eval_ic, "EvalConfig.ic_mode": p_eval_ic_mode,
    "EvalConfig.ic_layers": p_eval_ic_layers, "EvalConfig.clue": p_eval_clue, "EvalConfig.before_training": p_eval_before, "EvalConfig.seed": p_eval_seed,
    "EvalConfig.every_steps": p_eval_every_steps, "EvalConfig.every_rows": p_eval_every_rows,
    "RewardSpec.name": p_reward_name, "RewardSpec.weight": p_reward_weight, "RewardSpec.kwargs": p_reward_kwargs,
    "RewardSpec.transform": p_reward_transform, "EvalConfig.perplexity_consistency": p_eval_pc,
    "RLIFRecipeConfig.rewards": p_rlif_rewards, "RLIFRecipeConfig.log_accuracy": p_rlif_log_accuracy,
    "RLIFRecipeConfig.eval_data": p_rlif_eval_data,
    "ALoLRecipeConfig.rewards": p_alol_rewards, "ALoLRecipeConfig.eval_rewards": p_alol_eval_rewards,
    "ALoLRecipeConfig.value_split": p_alol_value_split, "ALoLRecipeConfig.value_rows": p_alol_value_rows,
    "ALoLRecipeConfig.eval_sets": p_alol_eval_sets, "ALoLRecipeConfig.variants": p_alol_variants,
    "DeCREDRecipeConfig.decred": p_decred_section, "DeCREDRecipeConfig.speech": p_decred_speech,
    "DeCREDRecipeConfig.compare_baseline": p_decred_compare, "DeCREDRecipeConfig.head_eval_rows": p_decred_head_rows,
    "DeCREDRecipeConfig.max_target_length": p_decred_target_length,
    **{f"DeCREDOptions.{f}": p_decred_option(f) for f in (*DECRED_VALUES, "ctc_weight")},
    **{f"SpeechConfig.{f}": p_speech_option(f) for f in SPEECH_VALUES},
    "SelfImproveRecipeConfig.rewards": p_si_rewards, "SelfImproveRecipeConfig.improve": p_improve_section,
    "SelfImproveRecipeConfig.instructions": p_si_instructions,
    **{f"ImproveConfig.{f}": p_improve_option(f) for f in (*IMPROVE_VALUES, "ds_valid_rows")},
    "EvaluateRecipeConfig.compare": p_ev_compare, "EvaluateRecipeConfig.label": p_ev_label,
    "EvaluateRecipeConfig.output_dir": p_ev_output_dir,
    "ZooRecipeConfig.zoo": p_zoo_section, "ZooRecipeConfig.compact": p_zoo_compact,
    "ZooRecipeConfig.output_dir": p_zoo_output_dir,
    "ZooSection.methods": p_zoo_methods, "ZooSection.seeds": p_zoo_seeds, "ZooSection.budget": p_zoo_budget,
    "ZooSection.only": p_zoo_only, "ZooSection.cache": p_zoo_cache, "ZooSection.base_label": p_zoo_base_label,
    "ZooMethod.name": p_zoo_method_name, "ZooMethod.config": p_zoo_method_config, "ZooMethod.recipe": p_zoo_method_recipe,
    "ZooMethod.label": p_zoo_method_label, "ZooMethod.budget": p_zoo_method_budget,
    "ZooMethod.overrides": p_zoo_method_overrides, "ZooMethod.trained": p_zoo_method_trained,
}


def test_every_field_has_a_probe():
    walked = walked_fields()
    assert walked - set(PROBES) == set(), "fields without a probe (add one to PROBES)"
    assert set(PROBES) - walked == set(), "probes of fields that no longer exist"


@pytest.mark.parametrize("field", sorted(PROBES))
def test_option_reaches_what_is_built(field, h):
    PROBES[field](h)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit loading (QLoRA) needs a CUDA GPU")
def test_qlora_rlif_trains_a_lora_on_a_4bit_policy(h):
    """On a GPU: ``model.quantization`` + ``peft:`` in the RLIF recipe gives a 4-bit policy whose
    LoRA weights (and only they) change in a training step."""
    pytest.importorskip("bitsandbytes")
    from recipes import rlif

    trained = []

    def train_only(cfg, trainer, tokenizer, test):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        trained.append((trainer, before))
        return {}
    h.mp.setattr(rlif, "train_and_evaluate", train_only)
    rlif.run(h.config("rlif", "model.quantization={bits: 4, compute_dtype: float32}", "peft={r: 4}",
                      "rewards=[{name: self_certainty}]", "model.name_or_path=tiny://qwen2?layers=2&hidden=128"))
    trainer, before = trained[0]
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    assert before and all("lora_" in n for n in before)
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "no LoRA weight changed"
