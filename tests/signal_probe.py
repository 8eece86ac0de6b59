"""A weight-0 reward that records what each rank scored, for multi-process tests.

Named in a config by dotted path (``tests.signal_probe.RecordSignals``), it writes, every time
TRL scores a batch, one ``.pt`` file per rank and call under ``directory``: the prompts, the
completion token ids and the per-token signals the RLIF trainer handed to the rewards. A test
then recomputes the signals single-process on the very same completions and compares.
It returns 0.0 for every completion, so with weight 0 it changes nothing in training.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rewards import InternalReward


class RecordSignals(InternalReward):
    """Records ``prompts``, ``completion_ids`` and ``token_signals`` (weight 0; returns zeros)."""

    abstract = True  # reachable by dotted path only, not registered by name
    name = "record_signals"

    def __init__(self, directory: str, signals: list[str] | None = None):
        self.directory = str(directory)
        self.signals = tuple(signals or ("self_certainty", "ic_soft", "ic_layers", "ic_answer_found"))
        self.calls = 0

    def __call__(self, prompts, completions, token_signals=None, completion_ids=None, **columns):
        rank = int(os.environ.get("RANK", "0"))
        path = Path(self.directory) / f"rank{rank}_call{self.calls}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"prompts": list(prompts), "completion_ids": [list(c) for c in completion_ids],
                    "token_signals": token_signals, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, path)
        self.calls += 1
        return [0.0] * len(completions)


def load_records(directory: str | Path, call: int = 0) -> list[dict]:
    """The records of one scoring call, in rank order (each ``{prompts, completion_ids, token_signals}``)."""
    paths = sorted(Path(directory).glob(f"rank*_call{call}.pt"), key=lambda p: int(p.name[4:].split("_")[0]))
    if not paths:
        raise FileNotFoundError(f"no records of call {call} under {directory}")
    return [torch.load(p, weights_only=False) for p in paths]


@torch.no_grad()
def reference_signals(model, tokenizer, prompt: str, completion_ids: list[int], temperature: float,
                      layers: list[int], fallback_last_k: int | None = 4) -> dict[str, torch.Tensor]:
    """Single-process, full-softmax reference of one completion's signals (no chunking, no hooks, no padding).

    ``self_certainty[t] = logsumexp(z_t) - mean(z_t) - log V`` with ``z_t`` the temperature-scaled
    logits (first ``V = len(tokenizer)`` rows) at the position predicting completion token ``t``;
    ``ic_soft[j, k] = softmax(head(norm(h^{l_k})))[y]`` at the ``j``-th answer token ``y``
    (``hidden_states[L]`` is already normed, so the last layer is the model's own logits).
    """
    from trainers.lens import answer_token_indices

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + list(completion_ids)])
    out = model(input_ids=ids, output_hidden_states=True)
    p, c, vocab = len(prompt_ids), len(completion_ids), len(tokenizer)
    z = out.logits[0, p - 1 : p - 1 + c, :vocab].double() / temperature
    certainty = torch.logsumexp(z, -1) - z.mean(-1) - torch.log(torch.tensor(float(vocab), dtype=torch.float64))
    answer, _ = answer_token_indices(tokenizer, completion_ids, fallback_last_k)
    positions = torch.tensor([p - 1 + t for t in answer], dtype=torch.long)
    emitted = torch.tensor([completion_ids[t] for t in answer], dtype=torch.long)
    n_layers = len(out.hidden_states) - 1
    head, norm = model.get_output_embeddings(), model.base_model.norm
    columns = []
    for layer in layers:
        h = out.hidden_states[layer][0, positions]
        logits = head(h if layer == n_layers else norm(h))[:, :vocab].double()
        columns.append(torch.softmax(logits, -1).gather(1, emitted[:, None])[:, 0])
    soft = torch.stack(columns, 1) if columns else torch.zeros(0, 0)
    return {"self_certainty": certainty, "ic_soft": soft}
