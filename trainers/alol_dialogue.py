"""A-LoL's text conventions: how a prompt looks to the policy, and how the reference answers.

The A-LoL reference formats Anthropic HH dialogues with a preamble and ``### Human:`` /
``### Assistant:`` markers (:func:`format_prompt`), generates greedily until EOS or a stop string,
and cuts a generated response at the next turn marker (:func:`finish_response`). The trainer's
dataset preparation (:mod:`trainers.alol`), the value targets of the precompute
(:mod:`trainers.alol_precompute`) and the recipe's evaluation (``recipes/alol.py``) all use these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def format_prompt(text: str, preamble: str | None = None, replace: dict[str, str] | None = None) -> str:
    """The policy's view of a text prompt: ``preamble + strip(replace(text))``; unchanged when neither is set.

    ``replace`` substitutions apply in order. With the A-LoL reference's HH values (preamble
    ``"A chat between ... questions.\\n"``, ``"\\n\\nHuman: " -> " ### Human: "``,
    ``"\\n\\nAssistant:" -> " ### Assistant:"``) an Anthropic HH dialogue becomes
    ``"<preamble>### Human: ... ### Assistant: ... ### Human: ... ### Assistant:"``.

    >>> format_prompt("\\n\\nHuman: Hi\\n\\nAssistant:", "P\\n", {"\\n\\nHuman: ": " ### Human: ", "\\n\\nAssistant:": " ### Assistant:"})
    'P\\n### Human: Hi ### Assistant:'
    """
    if preamble is None and not replace:
        return text
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    return (preamble or "") + text.strip()


def finish_response(text: str, cut: Sequence[str] = (), stop_strings: Sequence[str] = ()) -> str:
    """A generated response after the reference's post-hoc rule: cut at the first occurrence of each
    ``cut`` string (in order), strip, and drop a trailing stop string (generation stopped on it).
    Unchanged when neither is set.

    >>> finish_response(" Sure.\\nHuman: and then?", ["\\n Human:", "\\nHuman:", "\\n### Human"], ["###"])
    'Sure.'
    >>> finish_response(" Yes, gladly. ###", ["\\nHuman:"], ["###"])
    'Yes, gladly.'
    """
    if not cut and not stop_strings:
        return text
    for marker in cut:
        text = text.split(marker)[0]
    text = text.strip()
    for stop in stop_strings:
        if stop and text.endswith(stop):
            return text[: -len(stop)].strip()
    return text


def decode_response(tokenizer, ids: list[int]) -> str:
    """A response's text as the rewards see it: decoded without special tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def _greedy(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
            stop_strings: list[str] | None = None, desc: str = "A-LoL value: greedy answers") -> list[list[int]]:
    """Greedy continuations (left-padded batches), each cut after its first EOS (kept) or, with
    ``stop_strings``, where generation stopped on one (transformers' ``StopStringCriteria``)."""
    out = []
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    stop = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    for i in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, leave=False):
        chunk = prompt_ids[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos, **stop)
        for row in gen[:, width:].tolist():
            row = row[: row.index(eos) + 1] if eos in row else row
            if stop and pad != eos and pad in row:  # a row stopped by a stop string is padded after it
                row = row[: row.index(pad)]
            out.append(row)
    return out


def policy_prompt_ids(tokenizer, prompts: list, args) -> list[list[int]]:
    """Prompt token ids as the policy sees them in training: the A-LoL layout (``prompt_preamble``,
    ``prompt_replace``), tokenised as TRL tokenises a prompt (a text prompt through the tokenizer
    with its special tokens, a chat prompt through its template with the generation prompt), the
    last ``max_prompt_length`` tokens kept (a leading BOS stays). Runs no collective."""
    out = []
    limit, bos = args.max_prompt_length, tokenizer.bos_token_id
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(text=format_prompt(prompt, args.prompt_preamble, args.prompt_replace))["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        if limit is not None and len(ids) > limit:
            head = [ids[0]] if bos is not None and ids[0] == bos and limit > 1 else []
            ids = head + ids[len(ids) - (limit - len(head)) :]
        out.append(list(ids))
    return out


def greedy_responses(model, tokenizer, prompt_ids: list[list[int]], args, max_new_tokens: int, batch_size: int,
                     desc: str = "A-LoL greedy") -> tuple[list[str], list[list[int]]]:
    """The reference policy's answers as A-LoL scores them: greedy, stopped at EOS or a ``stop_strings``
    entry, decoded without special tokens and finished by :func:`finish_response`
    (``response_cut``). Returns the texts and their token ids (re-tokenised after finishing when the
    rule changed the text)."""
    was_training = model.training
    model.eval()
    try:
        rows = _greedy(model, tokenizer, prompt_ids, max_new_tokens, batch_size, args.stop_strings, desc)
    finally:
        model.train(was_training)
    cut, stops = list(args.response_cut or ()), list(args.stop_strings or ())
    texts, ids = [], []
    for row in rows:
        raw = decode_response(tokenizer, row)
        text = finish_response(raw, cut, stops)
        texts.append(text)
        ids.append(row if text == raw else tokenizer(text, add_special_tokens=False)["input_ids"])
    return texts, ids
