"""DeCRED / LayerSkip decoder regularisation: auxiliary next-token heads on intermediate decoder layers.

Decoder-only models train with ``DeCREDSFTTrainer`` (an ``SFTTrainer``), encoder-decoder models
(T5/BART families, and ``SpeechEncoderDecoderModel`` with the ``speech:`` section) with
``DeCREDSeq2SeqTrainer``; ``decred:`` sets the heads, weights, label smoothing and CTC::

    python -m recipes.decred --config configs/decred/tiny_seq2seq.yaml
    accelerate launch --config_file launch/accelerate/ddp.yaml -m recipes.decred --config FILE

After training, every head's held-out loss/perplexity (and, for encoder-decoder models, the
internal-LM perplexity) is printed; ``compare_baseline: true`` also trains the same model with
the heads as detached probes (plain fine-tuning) and prints both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import DataCollatorForSeq2Seq
from trl import SFTConfig

from trainers.decred import (DeCREDOptions, DeCREDSeq2SeqTrainer, DeCREDSFTTrainer, evaluate_heads,
                             from_pretrained_with_heads, seq2seq_args)
from trainers.distributed import outside_zero3, parameters_sharded

from .common.cli import main
from .common.data import load_split, to_sft_format
from .common.errors import ConfigError
from .common.modeling import load_model, load_tokenizer, lora_config
from .common.schema import ModelConfig, RecipeConfig
from .common.speech import SpeechConfig, load_speech_model, speech_batches, speech_data, speech_model, speech_report
from .common.training import held_out, resume_argument, train_and_evaluate


@dataclass
class DeCREDRecipeConfig(RecipeConfig):
    """Sections of the decred recipe; ``trainer:`` takes ``SFTConfig`` fields (converted to
    ``Seq2SeqTrainingArguments`` for encoder-decoder models)."""

    trainer_class = SFTConfig

    decred: DeCREDOptions = field(default_factory=DeCREDOptions, metadata={"help": "auxiliary heads and their loss"})
    speech: SpeechConfig | None = field(default=None, metadata={"help": "speech encoder-decoder (null: text model)"})
    compare_baseline: bool = field(default=False, metadata={
        "help": "also train the same model with detached probe heads (no regularisation) and compare"})
    head_eval_rows: int = field(default=256, metadata={"help": "held-out rows for the per-head loss table"})
    max_target_length: int = field(default=64, metadata={"help": "encoder-decoder: longest target in tokens"})


def seq2seq_features(data, tokenizer, max_length: int):
    """Text seq2seq rows: ``input_ids`` from the prompt, ``labels`` from the completion + EOS."""
    def encode(row):
        source = tokenizer(row["prompt"], add_special_tokens=False)
        target = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"], "labels": target}
    return data.map(encode, remove_columns=data.column_names)


def causal_features(data, tokenizer):
    """Decoder-only held-out rows as SFT sees them: prompt + completion + EOS, loss on the completion."""
    def encode(row):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = prompt + completion
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion}
    return data.map(encode, remove_columns=data.column_names)


def build_trainer(cfg: DeCREDRecipeConfig, args, options: DeCREDOptions, tokenizer, train, collator=None):
    """A fresh model of ``cfg.model`` (decoder-only, text or speech encoder-decoder) and its trainer."""
    if cfg.speech is not None:
        args.remove_unused_columns = False  # the collator reads the raw audio and text columns
        return DeCREDSeq2SeqTrainer(model=speech_model(cfg.speech, tokenizer), args=seq2seq_args(args),
                                    train_dataset=train, data_collator=collator, processing_class=tokenizer, decred=options)
    model = load_model(cfg.model)
    if getattr(model.config, "is_encoder_decoder", False):
        if cfg.peft is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(cfg.peft, model))
        rows = seq2seq_features(train, tokenizer, cfg.max_target_length)
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        return DeCREDSeq2SeqTrainer(model=model, args=seq2seq_args(args), train_dataset=rows, data_collator=collator,
                                    processing_class=tokenizer, decred=options)
    return DeCREDSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora_config(cfg.peft, model), decred=options)


def head_table(reports: dict[str, dict]) -> str:
    metrics = list(dict.fromkeys(k for r in reports.values() for k in r))
    lines = ["run".ljust(14) + "".join(m.rjust(16) for m in metrics)]
    for name, report in reports.items():
        lines.append(name.ljust(14) + "".join((f"{report[m]:.3f}" if m in report else "-").rjust(16) for m in metrics))
    return "\n".join(lines)


def evaluate_run(cfg: DeCREDRecipeConfig, trainer, tokenizer, test) -> dict:
    """Per-head held-out loss/perplexity (plain CE), plus internal-LM ones for encoder-decoders.

    Runs on the main process alone; under ZeRO-3 / FSDP, where it holds only a shard of the model,
    on a whole copy of the saved model, heads included."""
    with outside_zero3():
        model = trainer.model
        if parameters_sharded(trainer):
            load = load_speech_model if cfg.speech is not None else from_pretrained_with_heads
            model = load(trainer.args.output_dir).to(trainer.accelerator.device).eval()
        return _evaluate_heads_of(cfg, trainer, model, tokenizer, test)


def _evaluate_heads_of(cfg: DeCREDRecipeConfig, trainer, model, tokenizer, test) -> dict:
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    if cfg.speech is not None:
        batches = speech_batches(test, trainer.data_collator, model.device)
        report = evaluate_heads(model, batches, trainer.decred_options)
        report.update(speech_report(model, tokenizer, batches, cfg.speech.eval_max_new_tokens))
    else:
        rows = test.select(range(min(cfg.head_eval_rows, len(test))))
        rows = (seq2seq_features(rows, tokenizer, cfg.max_target_length) if encoder_decoder
                else causal_features(to_sft_format(rows), tokenizer))
        collator = DataCollatorForSeq2Seq(tokenizer, model=model if encoder_decoder else None, label_pad_token_id=-100)
        batches = [{k: v.to(model.device) for k, v in collator([rows[j] for j in range(i, min(i + 64, len(rows)))]).items()}
                   for i in range(0, len(rows), 64)]
        report = evaluate_heads(model, batches, trainer.decred_options)
    if encoder_decoder:
        ilm = evaluate_heads(model, batches, trainer.decred_options, internal_lm=True)
        report.update({f"ilm_{k}": v for k, v in ilm.items() if k.startswith("ppl")})
    return report


def run(cfg: DeCREDRecipeConfig) -> dict:
    if cfg.speech is None and cfg.decred.ctc_weight > 0:
        raise ConfigError(cfg.source, "decred.ctc_weight", "the CTC head needs a speech encoder-decoder (speech: section)")
    if cfg.speech is not None:  # the speech model is built from its own section: nothing loads model.* or a LoRA
        defaults = ModelConfig(name_or_path=cfg.model.name_or_path, dtype=cfg.model.dtype if cfg.model.dtype in
                               ("auto", "float32") else "auto")  # a model built from scratch is float32
        for key, value in (*((f"model.{f.name}", getattr(cfg.model, f.name)) for f in dataclasses.fields(ModelConfig)
                             if getattr(cfg.model, f.name) != getattr(defaults, f.name)), ("peft", cfg.peft)):
            if value is not None:
                raise ConfigError(cfg.source, key, "a speech encoder-decoder is built from speech.encoder/decoder and "
                                  "trained whole: remove it")
    if cfg.speech is not None and cfg.model.name_or_path != "scratch":
        raise ConfigError(cfg.source, "model.name_or_path", "speech models are built from speech.encoder/decoder: "
                          "set it to 'scratch'")
    collator = None
    if cfg.speech is None:
        train, test = to_sft_format(load_split(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source)), held_out(cfg)
        tokenizer = load_tokenizer(cfg.model, padding_side="right")
    else:
        tokenizer, train, test, collator = speech_data(cfg, Path(cfg.trainer.output_dir))
    runs = {"decred": cfg.decred}
    if cfg.compare_baseline:
        runs["baseline"] = dataclasses.replace(cfg.decred, detach=True)
    reports, out_dir = {}, Path(cfg.trainer.output_dir)
    for name, options in runs.items():
        args = copy.copy(cfg.trainer)
        args.output_dir = str(out_dir if name == "decred" else out_dir / name)
        trainer = build_trainer(cfg, args, options, tokenizer, train, collator)
        if cfg.speech is None:
            # generation accuracy needs gold answers; the per-head table below does not
            train_and_evaluate(cfg, trainer, tokenizer, test if test is not None and "answer" in test.column_names else None)
        else:
            trainer.train(resume_from_checkpoint=resume_argument(args))
            trainer.save_model(args.output_dir)
        if trainer.is_world_process_zero() and test is not None:
            reports[name] = evaluate_run(cfg, trainer, tokenizer, test)
    if reports:
        (out_dir / "heads.json").write_text(json.dumps(reports, indent=2))
        print("held-out per-head loss / perplexity (plain CE; final = the model's own head)", flush=True)
        print(head_table(reports), flush=True)
    return reports


if __name__ == "__main__":
    main("decred", DeCREDRecipeConfig, run)
