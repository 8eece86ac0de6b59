"""A sequence-classification reward model (Hub name or local directory) as a reward.

The A-LoL paper scores Anthropic HH responses with an OpenAssistant reward model squashed by a
sigmoid; any ``AutoModelForSequenceClassification`` with one output works the same way. The model
loads lazily on first use (so configs validate without it) onto the available accelerator, and
scores in batches without gradients.
"""

from __future__ import annotations

import math

from .base import Reward, completion_text

SQUASH = {
    "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x)),
    "tanh": math.tanh,
    "identity": lambda x: x,
}


class RewardModel(Reward):
    """``squash(score)`` of a sequence-classification model on ``template`` filled with the pair.

    Args:
        name_or_path: Hub name or local directory of an ``AutoModelForSequenceClassification``.
        squash: ``sigmoid`` (default), ``tanh`` or ``identity``.
        template: how (prompt, completion) become the model's input text (``{prompt}``, ``{completion}``).
        replace: substitutions applied to the filled text, in order (e.g. HH's ``"\\n\\nHuman: "`` turn
            markers -> OpenAssistant's ``<|prompter|>``).
        batch_size, max_length: scoring batch size and truncation (from the left: the response end is kept).
        device: ``None`` picks CUDA/XPU/MPS when available, else CPU.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto``: as saved).

    >>> RewardModel("some/rm", squash="tanh").squash
    'tanh'
    """

    name = "reward_model"

    def __init__(self, name_or_path: str, squash: str = "sigmoid", template: str = "{prompt}{completion}",
                 replace: dict[str, str] | None = None, batch_size: int = 16, max_length: int | None = 1024,
                 device: str | None = None, dtype: str = "auto", revision: str | None = None):
        if squash not in SQUASH:
            raise ValueError(f"reward_model: squash must be one of {sorted(SQUASH)}, got {squash!r}")
        if "{completion}" not in template:
            raise ValueError("reward_model: template must contain {completion}")
        self.name_or_path, self.squash, self.template = name_or_path, squash, template
        self.replace, self.batch_size, self.max_length = dict(replace or {}), batch_size, max_length
        self.device, self.dtype, self.revision = device, dtype, revision
        self._model = self._tokenizer = None

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k not in ("_model", "_tokenizer")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._model = self._tokenizer = None

    def __repr__(self) -> str:
        return f"RewardModel({self.__getstate__()!r})"

    def _load(self):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = self.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else "cpu"
        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, revision=self.revision)
        self._tokenizer.truncation_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path, revision=self.revision, dtype=dtype)
        if model.config.num_labels != 1:
            raise ValueError(f"reward_model {self.name_or_path}: expected one output (num_labels=1), "
                             f"got {model.config.num_labels}")
        model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = model.to(device).eval()

    def text(self, prompt, completion) -> str:
        filled = self.template.format(prompt=completion_text(prompt), completion=completion_text(completion))
        for old, new in self.replace.items():
            filled = filled.replace(old, new)
        return filled

    def raw_scores(self, texts: list[str]) -> list[float]:
        import torch

        if self._model is None:
            self._load()
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                        truncation=self.max_length is not None, max_length=self.max_length)
                logits = self._model(**batch.to(self._model.device)).logits[:, 0]
                out.extend(logits.float().cpu().tolist())
        return out

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        squash = SQUASH[self.squash]
        return [squash(x) for x in self.raw_scores(texts)]
