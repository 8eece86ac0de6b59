"""Speech encoder-decoder plumbing for the decred recipe (``speech:`` section).

A ``SpeechEncoderDecoderModel`` is built from two transformers configs (random init, trained
from scratch as in DeCRED): a raw-waveform speech encoder (``speech.encoder``, e.g.
``wav2vec2-conformer``) and a causal decoder with cross-attention (``speech.decoder``, e.g.
``gpt2``). Text units come from ``speech.tokenizer`` or a BPE tokenizer of ``speech.bpe_vocab``
units trained on the training transcripts (saved beside the run). Rows hold a waveform
(``datasets.Audio``, a ``{"array", "sampling_rate"}`` dict or a plain list of floats) and its
transcript.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import load_rows
from .errors import ConfigError

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class SpeechConfig:
    """Speech encoder-decoder built from configs, its text units and its data columns."""

    encoder: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "transformers config of the speech encoder: model_type plus sizes (random init)"})
    decoder: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "transformers config of the causal decoder: model_type plus sizes (cross-attention is added)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer name/dir (null: train BPE on the transcripts)"})
    bpe_vocab: int = field(default=5000, metadata={"help": "BPE units when the tokenizer is trained here"})
    audio_column: str = field(default="audio", metadata={"help": "waveform column"})
    text_column: str = field(default="text", metadata={"help": "transcript column"})
    sampling_rate: int = field(default=16000, metadata={"help": "sampling rate the encoder expects"})
    max_target_length: int = field(default=256, metadata={"help": "longest transcript in tokens"})
    lowercase: bool = field(default=False, metadata={"help": "lower-case transcripts"})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "greedy decoding budget for the held-out WER"})
    mask_unks: bool = field(default=False, metadata={
        "help": "labels equal to the unknown token are ignored (-100) by the CE and CTC losses (the reference's --mask_unks)"})
    decoder_pos_emb_fixed: bool = field(default=False, metadata={
        "help": "GPT-2 decoder: token embedding × √d plus fixed sinusoidal positions instead of learned ones "
                "(the reference's --decoder_pos_emb_fixed)"})
    seed: int = field(default=0, metadata={"help": "initialisation seed (same for the baseline run)"})


def _waveform(value) -> list[float]:
    if isinstance(value, dict):
        return value["array"]
    if hasattr(value, "get_all_samples"):  # torchcodec decoder (datasets >= 4)
        return value.get_all_samples().data.mean(0).tolist()
    return value


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with ``<pad>`` (= CTC blank, id 0), ``<s>``, ``</s>``, ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right")


class SpeechCollator:
    """Rows -> ``input_values``/``attention_mask`` (normalised waveforms) and ``labels`` (+EOS, -100 pad)."""

    def __init__(self, tokenizer, speech: SpeechConfig):
        from transformers import Wav2Vec2FeatureExtractor

        self.tokenizer, self.speech = tokenizer, speech
        self.features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=speech.sampling_rate, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)

    def __call__(self, rows: list[dict]) -> dict:
        s = self.speech
        audio = self.features([_waveform(r[s.audio_column]) for r in rows], sampling_rate=s.sampling_rate,
                              padding=True, return_tensors="pt")
        texts = [r[s.text_column].lower() if s.lowercase else r[s.text_column] for r in rows]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: s.max_target_length - 1]
               + [self.tokenizer.eos_token_id] for t in texts]
        longest = max(len(i) for i in ids)
        labels = torch.tensor([i + [-100] * (longest - len(i)) for i in ids])
        if s.mask_unks and self.tokenizer.unk_token_id is not None:
            labels = labels.masked_fill(labels == self.tokenizer.unk_token_id, -100)
        return {"input_values": audio["input_values"], "attention_mask": audio["attention_mask"], "labels": labels}


def speech_data(cfg, out_dir: Path):
    """Tokenizer, train and held-out rows, collator for the ``speech:`` section of ``cfg``."""
    from datasets import Audio
    from transformers import AutoTokenizer

    s = cfg.speech
    splits = {"train": load_rows(cfg.data, cfg.data.split, cfg.data.max_rows, cfg.source)}
    if cfg.data.eval_split:
        splits["test"] = load_rows(cfg.data, cfg.data.eval_split, cfg.eval.max_rows, cfg.source)
    for name, rows in splits.items():
        for column in (s.audio_column, s.text_column):
            if column not in rows.column_names:
                raise ConfigError(cfg.source, f"speech.{'audio' if column == s.audio_column else 'text'}_column",
                                  f"column {column!r} not in {cfg.data.path} (columns: {rows.column_names})")
        if isinstance(rows.features[s.audio_column], Audio):
            splits[name] = rows.cast_column(s.audio_column, Audio(sampling_rate=s.sampling_rate))
    if s.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    else:
        texts = splits["train"][s.text_column]
        tokenizer = train_bpe([t.lower() if s.lowercase else t for t in texts], s.bpe_vocab)
        tokenizer.save_pretrained(out_dir)
    return tokenizer, splits["train"], splits.get("test"), SpeechCollator(tokenizer, s)


class ScaledEmbedding(torch.nn.Embedding):
    """Token embedding times ``√d`` (the reference's ``AdaptiveEmbedding`` without cut-offs)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embedding_dim**0.5


class SinusoidalPositions(torch.nn.Module):
    """Fixed positions ``pe(p) = [sin(p ω_0), ..., sin(p ω_{d/2-1}), cos(p ω_0), ..., cos(p ω_{d/2-1})]``,
    ``ω_i = 10000^{-2i/d}`` (sines then cosines, as the reference's ``PositionalEmbedding``); no weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0) / dim)), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq.float()
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.inv_freq.dtype)


def use_fixed_positions(decoder) -> None:
    """Swap a GPT-2 decoder's learned positions for :class:`SinusoidalPositions` and its token
    embedding for a :class:`ScaledEmbedding` over the same weight; marks ``config.pos_emb_fixed``
    (idempotent; call it again after ``from_pretrained``: :func:`load_speech_model`)."""
    body = getattr(decoder, "transformer", None)
    if body is None or not hasattr(body, "wpe"):
        raise ValueError(f"speech.decoder_pos_emb_fixed needs a GPT-2 decoder, got {type(decoder).__name__}")
    if not isinstance(body.wte, ScaledEmbedding):
        old = body.wte
        new = ScaledEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                              device=old.weight.device, dtype=old.weight.dtype)
        new.weight = old.weight  # same parameter: loaded values and any tying survive
        body.wte = new
    if not isinstance(body.wpe, SinusoidalPositions):
        body.wpe = SinusoidalPositions(body.embed_dim).to(body.wte.weight.device, body.wte.weight.dtype)
    decoder.config.pos_emb_fixed = True


def load_speech_model(path):
    """A saved speech model as trained: ``SpeechEncoderDecoderModel.from_pretrained``, the fixed
    positions re-applied when its decoder config says so, and its DeCRED heads."""
    from transformers import SpeechEncoderDecoderModel

    from trainers.decred import load_heads

    model = SpeechEncoderDecoderModel.from_pretrained(path)
    if getattr(model.config.decoder, "pos_emb_fixed", False):
        use_fixed_positions(model.decoder)
    load_heads(model, path)
    return model


def speech_model(s: SpeechConfig, tokenizer):
    """A random-init ``SpeechEncoderDecoderModel`` from ``s.encoder`` and ``s.decoder`` configs."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SpeechEncoderDecoderModel

    enc = dict(s.encoder)
    dec = dict(s.decoder)
    try:
        enc_cfg = AutoConfig.for_model(enc.pop("model_type"), **enc)
        dec_cfg = AutoConfig.for_model(dec.pop("model_type"), **dec, vocab_size=len(tokenizer), is_decoder=True,
                                       add_cross_attention=True, pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    except (KeyError, ValueError) as err:
        raise ValueError(f"speech.encoder / speech.decoder need a valid model_type: {err}") from None
    torch.manual_seed(s.seed)
    model = SpeechEncoderDecoderModel(encoder=AutoModel.from_config(enc_cfg), decoder=AutoModelForCausalLM.from_config(dec_cfg))
    if s.decoder_pos_emb_fixed:
        use_fixed_positions(model.decoder)
        torch.nn.init.normal_(model.decoder.transformer.wte.weight)  # N(0, 1), as the reference's fresh embedding
        model.config.decoder.pos_emb_fixed = True
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return model


def speech_batches(rows, collator, device, batch_size: int = 16) -> list[dict]:
    return [{k: v.to(device) for k, v in collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).items()}
            for i in range(0, len(rows), batch_size)]


def word_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Σ word edit distance / Σ reference words."""
    errors = words = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        errors, words = errors + row[-1], words + len(r)
    return errors / max(words, 1)


@torch.no_grad()
def speech_report(model, tokenizer, batches: list[dict], max_new_tokens: int = 128) -> dict:
    """Greedy-decoding WER on the held-out batches."""
    was_training = model.training
    model.eval()
    hyps, refs = [], []
    try:
        for batch in batches:
            ids = model.generate(input_values=batch["input_values"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False)
            hyps += tokenizer.batch_decode(ids, skip_special_tokens=True)
            labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
            refs += tokenizer.batch_decode(labels, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return {"wer": word_error_rate(hyps, refs)}


def dry_run_overrides(speech: dict, workdir: Path, n: int = 8) -> list[str]:
    """``--dry-run``: a 1-block, 32-wide encoder and a 32-wide decoder (same depth, so the heads'
    layers stay valid), a 64-unit BPE, and ``n`` random half-second waveforms with arithmetic
    transcripts under the config's own column names."""
    import json
    import random

    from .tiny.tasks import ArithmeticSpec, arithmetic_rows

    rng = random.Random(0)
    audio, text = speech.get("audio_column", "audio"), speech.get("text_column", "text")
    rows = arithmetic_rows(ArithmeticSpec(n_train=n, seed=1), "train")
    path = workdir / "speech_rows.jsonl"
    path.write_text("\n".join(json.dumps({audio: [rng.uniform(-1, 1) for _ in range(8000)],
                                           text: f"{r['question']} {r['answer']}"}) for r in rows))
    out = [f"data.path={path}", "data.eval_split=train", "trainer.dataloader_num_workers=0",
           "speech.tokenizer=null", "speech.bpe_vocab=64",
           "speech.eval_max_new_tokens=4", "speech.encoder.hidden_size=32", "speech.encoder.num_hidden_layers=1",
           "speech.encoder.num_attention_heads=2", "speech.encoder.intermediate_size=64",
           "speech.encoder.conv_dim=[32,32]", "speech.encoder.conv_kernel=[10,3]", "speech.encoder.conv_stride=[5,2]",
           "speech.encoder.num_conv_pos_embeddings=16", "speech.encoder.num_conv_pos_embedding_groups=2",
           "speech.decoder.hidden_size=32", "speech.decoder.num_attention_heads=2"]
    decoder = speech.get("decoder", {})
    out += [f"speech.decoder.{key}=64" for key in ("n_inner", "intermediate_size") if key in decoder]
    return out
