"""A stand-in ``vllm`` module for CPU tests of ``eval.backend: vllm``: it records how ``vllm.LLM`` and
``vllm.SamplingParams`` are called and answers every prompt with a fixed completion. Nothing here
runs vLLM; it checks what this project hands to vLLM and what it does with vLLM's answer.

    fake = fake_vllm_module(reply=" 7", eos_id=tokenizer.eos_token_id, encode=...)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    ... fake.engines[0].init_kwargs, fake.engines[0].calls[0] == (inputs, [SamplingParams, ...])
"""

from __future__ import annotations

import types
from dataclasses import dataclass


class SamplingParams:
    """Records its keyword arguments (``n``, ``temperature``, ``top_p``, ``max_tokens``, ``seed``, ...)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.n = kwargs.get("n", 1)


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def fake_vllm_module(reply_ids: list[int], reply_text: str, trailing: list[int] = ()) -> types.ModuleType:
    """A module with ``LLM`` and ``SamplingParams``: every completion is ``reply_ids`` followed by
    ``trailing`` ids (what a real engine might return after EOS), its text ``reply_text``; the
    module's ``engines`` lists the ``LLM`` objects built."""
    module = types.ModuleType("vllm")
    module.engines = []

    class LLM:
        def __init__(self, **kwargs):
            self.init_kwargs, self.calls = kwargs, []
            module.engines.append(self)

        def generate(self, prompts, sampling_params, use_tqdm=True):
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
            self.calls.append((prompts, params))
            return [RequestOutput(p["prompt_token_ids"],
                                  [CompletionOutput(reply_text, [*reply_ids, *trailing]) for _ in range(sp.n)])
                    for p, sp in zip(prompts, params)]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module
