"""Generation for evaluation and data building: a model's completions to prompts, in batches.

A leaf of ``recipes.common``: the held-out evaluation (:mod:`recipes.common.evaluation`), self-improvement's
sampling (:mod:`recipes.common.rounds`), reward evaluation and the tiny world's sampled datasets
(:mod:`recipes.common.tiny.samples`) all generate through it.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
             desc: str = "generate") -> tuple[list[str], list[list[int]]]:
    """Completions (``num_return_sequences`` per prompt, grouped by prompt): texts and token ids
    (cut after the first EOS, which is kept, as TRL does)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    texts = prompt_texts(tokenizer, prompts)
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    decoded: list[str] = []
    ids_out: list[list[int]] = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                 pad_token_id=tokenizer.pad_token_id, top_k=None, **sampling)
            new = ids[:, 1:] if encoder_decoder else ids[:, batch["input_ids"].shape[1] :]
            for row in new.tolist():  # rows that stop early are padded after their EOS
                ids_out.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
            decoded.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return decoded, ids_out


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Prompt strings; chat prompts go through the tokenizer's chat template."""
    return [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts]
