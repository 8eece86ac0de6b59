"""Model and tokenizer loading: Hub names, local directories and ``tiny://`` URIs alike."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from .errors import ConfigError
from .schema import LoraConfigSection, ModelConfig
from .tiny import is_tiny, resolve_tiny_model

logger = logging.getLogger("intrinsic")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """A loadable name or directory: ``tiny://`` URIs become cached directories."""
    return resolve_tiny_model(name_or_path) if is_tiny(name_or_path) else name_or_path


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def model_init_kwargs(cfg: ModelConfig) -> dict:
    """``from_pretrained`` keyword arguments for ``cfg`` (also what TRL's ``model_init_kwargs`` takes)."""
    kwargs = {"dtype": DTYPES[cfg.dtype], **_hub_kwargs(cfg)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


@contextmanager
def _unloadable(cfg: ModelConfig, what: str):
    """A model name the Hub does not know (or that is not cached offline), a gated or private one, a
    directory that holds no such file: a config error naming ``model.name_or_path``, before any weights."""
    try:
        yield
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("config", "model.name_or_path", f"cannot load the {what} of {cfg.name_or_path}: {first}") from None


def load_tokenizer(cfg: ModelConfig, padding_side: str = "left"):
    """The model's tokenizer with a pad token (EOS when it has none, as TRL does; logged)."""
    with _unloadable(cfg, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path), **_hub_kwargs(cfg))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("config", "model.name_or_path", f"the tokenizer of {cfg.name_or_path} has neither a pad "
                                                              "nor an EOS token")
        logger.warning("%s: tokenizer has no pad token; using EOS (%r)", cfg.name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(cfg: ModelConfig):
    """A ``BitsAndBytesConfig`` for ``model.quantization`` (QLoRA), or ``None``; fails clearly without a GPU."""
    q = cfg.quantization
    if q is None:
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"{cfg.name_or_path}: model.quantization (4-bit {q.quant_type}, QLoRA) needs a CUDA GPU and "
                         "bitsandbytes; set model.quantization=null to load unquantised (or use --dry-run)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.quantization needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[q.compute_dtype])


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """A causal LM or a seq2seq model, whichever the checkpoint's config says it is (4-bit with
    ``model.quantization``; with ``model.adapter`` a trainable PEFT model carrying that adapter)."""
    path = resolve_model_path(cfg.name_or_path)
    with _unloadable(cfg, "config"):
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(cfg))
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = model_init_kwargs(cfg)
    quantization = quantization_config(cfg)
    if quantization is not None:  # 4-bit weights are placed at load time: on this process's GPU
        from accelerate import PartialState

        kwargs.update(quantization_config=quantization, device_map={"": PartialState().device})
    model = auto.from_pretrained(path, **kwargs)
    if cfg.adapter:
        from peft import PeftModel, prepare_model_for_kbit_training

        if quantization is not None:
            model = prepare_model_for_kbit_training(model)
        model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    return model


def to_device(model: PreTrainedModel, device) -> PreTrainedModel:
    """``model`` on ``device`` (a quantized model stays where its loader put it)."""
    if device is None or getattr(model, "hf_quantizer", None) is not None:
        return model
    return model.to(device)


def lora_config(section: LoraConfigSection | None, model: PreTrainedModel | None = None):
    """A PEFT ``LoraConfig`` from the ``peft:`` section, or ``None`` for a full fine-tune."""
    if section is None:
        return None
    from peft import LoraConfig, TaskType

    seq2seq = model is not None and getattr(model.config, "is_encoder_decoder", False)
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
    )
