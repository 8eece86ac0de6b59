"""``--dry-run``: any config, 2 steps, on a tiny model of the same family and a few generated rows.

The config is loaded as usual, then overridden (dotlist, like a user would) so that the real
recipe code runs end to end in seconds on a CPU: the model becomes a random tiny model of the
same architecture family, the dataset a few arithmetic rows written under the config's own
column names, and the trainer 2 short steps without vLLM, mixed precision or checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .config import load_raw
from .errors import ConfigError
from .schema import RecipeConfig
from .tiny.tasks import ArithmeticSpec, arithmetic_rows

FAMILIES = {"qwen": "qwen2", "llama": "llama", "mistral": "llama", "deepseek": "llama", "t5": "t5", "bart": "t5"}
TINY = "tiny://{family}?layers=1&hidden=32&heads=2&kv_heads=1&intermediate=64"


def tiny_family(name_or_path: str) -> str:
    """The tiny family standing in for a model name or a local checkpoint directory."""
    config = Path(os.path.expanduser(name_or_path)) / "config.json"
    name = json.loads(config.read_text()).get("model_type", "") if config.is_file() else name_or_path
    for key, family in FAMILIES.items():
        if key in name.lower():
            return family
    raise ValueError(f"--dry-run: no tiny stand-in for model {name_or_path!r} (known: {sorted(FAMILIES)})")


def write_rows(columns: dict, path: Path, n: int = 16) -> Path:
    """``n`` arithmetic rows under the dataset's own column names (answers boxed, like MATH)."""
    rows = arithmetic_rows(ArithmeticSpec(n_train=n, seed=1), "train")
    names = {role: columns.get(role, role) for role in ("question", "answer", "completion")}
    path.write_text("\n".join(json.dumps({names["question"]: r["question"], names["answer"]: f"\\boxed{{{r['answer']}}}",
                                          names["completion"]: r["completion"]}) for r in rows))
    return path


def write_graded_rows(grader: str, data: dict, path: Path) -> Path:
    """Rows for an ``eval.grader`` other than ``answer``, from the tiny world's hand-written tasks, under
    the config's own column names: programs with tests (``code``), functions with an input and output
    (``output_prediction``), four-option questions (``choice``: in ``data.choices``'s columns, or, without
    it, options in the question and the gold letter as the answer)."""
    from rewards.choice import option_letters

    from .data import choice_order
    from .tiny import resolve_tiny_dataset

    columns = data.get("columns") or {}
    question, answer = columns.get("question", "question"), columns.get("answer", "answer")
    source = {"code": "tiny://code", "output_prediction": "tiny://cruxeval", "choice": "tiny://gpqa"}[grader]
    rows = []
    for row in resolve_tiny_dataset(source, "train").to_list():
        if grader == "choice":
            choices = data.get("choices") or {}
            wrong = [row[f"Incorrect Answer {k % 3 + 1}"] + (f" ({k})" if k >= 3 else "")
                     for k in range(len(choices.get("incorrect") or [0] * 3))]
            if choices:
                row = {question: row["Question"], choices["correct"]: row["Correct Answer"],
                       **dict(zip(choices["incorrect"], wrong))}
            else:
                options, letters = [row["Correct Answer"], *wrong], option_letters(1 + len(wrong))
                order = choice_order(0, len(rows), len(options))
                listed = "\n".join(f"{letter}) {options[k]}" for letter, k in zip(letters, order))
                row = {question: f"{row['Question']}\n{listed}", answer: letters[order.index(0)]}
        else:
            row.setdefault(question, row.pop("question"))
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def dry_run_overrides(schema: type[RecipeConfig], path: str | os.PathLike, overrides: list[str], workdir: Path) -> list[str]:
    """Dotlist overrides that shrink the config at ``path`` to a 2-step CPU run in ``workdir``."""
    raw, _ = load_raw(path, overrides)
    if raw.get("speech") is not None:  # a speech model built from configs: shrink it, random waveforms
        from .speech import dry_run_overrides as speech_overrides

        out = speech_overrides(raw["speech"], Path(workdir))
    else:
        try:
            family = tiny_family(str(raw.get("model", {}).get("name_or_path", "")))
        except ValueError as err:
            raise ConfigError(str(path), "model.name_or_path", str(err)) from None
        data_file = write_rows(raw.get("data", {}).get("columns") or {}, Path(workdir) / "rows.jsonl")
        grader = (raw.get("eval") or {}).get("grader", "answer")
        if grader != "answer":  # rows the grader can read (tests, outputs, option letters)
            data_file = write_graded_rows(grader, raw.get("data") or {}, data_file)
        tiny = TINY.format(family=family)
        aux_layers = (raw.get("decred") or {}).get("layers") or []
        if aux_layers:  # deep enough for the config's auxiliary heads
            tiny = tiny.replace("layers=1", f"layers={max(aux_layers) + 1}")
        out = [f"model.name_or_path={tiny}", f"data.path={data_file}"]
    fields = {f.name for f in dataclasses.fields(schema.trainer_class)} if schema.trainer_class else set()
    out += [
        "model.dtype=float32", "model.attn_implementation=null", "model.revision=null", "model.quantization=null",
        "model.adapter=null", "data.name=null", "data.data_dir=null", "data.split_on=null", "data.max_rows=null",
        "eval.max_rows=4", "eval.max_new_tokens=4", "eval.batch_size=4", "eval.num_samples=1", "eval.pass_k=[]",
        "eval.before_training=false", "eval.backend=hf", f"trainer.output_dir={Path(workdir) / 'out'}", "trainer.max_steps=2",
        "trainer.report_to=[]", "trainer.save_strategy='no'", "trainer.logging_steps=1", "trainer.bf16=false",
        "trainer.gradient_checkpointing=false", "trainer.gradient_accumulation_steps=1",
    ]
    if (raw.get("eval") or {}).get("perplexity_consistency"):  # scores a group: at least two samples
        out.append("eval.num_samples=2")
    trainer = raw.get("trainer") or {}
    if "num_generations" in fields:
        out += [f"trainer.per_device_train_batch_size={trainer.get('num_generations') or 8}",
                "trainer.steps_per_generation=null", "trainer.generation_batch_size=null",
                "trainer.max_completion_length=8", "trainer.use_vllm=false", "trainer.log_completions=false"]
    else:
        out.append("trainer.per_device_train_batch_size=2")
    if "max_length" in fields:
        out.append("trainer.max_length=64")
    own = {f.name for f in dataclasses.fields(schema)}
    if "output_dir" in own:  # recipes.evaluate writes its report there
        out.append(f"output_dir={Path(workdir) / 'out'}")
    if "improve" in own:  # self-improvement: one small round
        write_rows(raw.get("data", {}).get("columns") or {}, data_file, n=64)
        ds = 3 if (raw.get("improve") or {}).get("ds_valid_rows") else 0  # <= 5% of the 61 prompts left
        out += ["improve.iterations=1", "improve.num_samples=2", "improve.max_new_tokens=4", "improve.batch_size=8",
                "improve.prompts_per_round=null", f"improve.ds_valid_rows={ds}"]
        if "max_length" in fields:  # character-level prompts (system prompt included) need more than 64 tokens
            out.append("trainer.max_length=512")
        if raw.get("instructions"):
            columns = raw["instructions"].get("columns") or {}
            pairs = write_rows(columns, Path(workdir) / "pairs.jsonl", n=8)
            out += [f"instructions.path={pairs}", "instructions.name=null", "instructions.max_rows=null"]
    if "value_max_new_tokens" in fields:  # A-LoL: a short precompute in a throwaway cache
        out += ["trainer.value_max_new_tokens=4", "trainer.precompute_batch_size=4", "trainer.value_epochs=1",
                "trainer.max_prompt_length=48", "trainer.max_completion_length=16",  # 48 + 16 = max_length
                "trainer.drop_nonpositive=false",  # a random stand-in reward model may leave no A > 0
                f"trainer.alol_cache_dir={Path(workdir) / 'alol-cache'}"]
    if "eval_data" in own:  # a separate held-out set (MATH-500): the generated rows stand in
        out.append("eval_data=null")
    if "value_rows" in own:
        out.append("value_rows=4")
    for section in ("rewards", "eval_rewards"):  # reward models: a tiny random one stands in
        for i, spec in enumerate(raw.get(section) or []):
            if isinstance(spec, dict) and spec.get("name") == "reward_model":
                out += [f"{section}.{i}.kwargs.name_or_path={tiny_reward_model(Path(workdir) / 'reward_model')}",
                        f"{section}.{i}.kwargs.dtype=float32", f"{section}.{i}.kwargs.revision=null"]
    return out


def tiny_reward_model(directory: Path) -> str:
    """A random 1-layer Qwen2 sequence classifier (one output) with the character tokenizer."""
    if not (directory / "config.json").exists():
        import torch
        from transformers import AutoModelForSequenceClassification, Qwen2Config

        from .tiny.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer()
        config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
        tok.save_pretrained(directory)
    return str(directory)
