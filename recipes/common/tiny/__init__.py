"""The offline tiny world: a character tokenizer, tiny models, generated tasks, a warm-up.

Configs address it like any model or dataset, by URI::

    tiny://qwen2?layers=3&hidden=128          random-init tiny Qwen2 (also: llama, t5)
    tiny://qwen2-arith?digits=2&ops=add       the same, after a supervised warm-up on arithmetic
    tiny://arithmetic?ops=add,mul&digits=2    the arithmetic task (train/test splits)
    tiny://code, tiny://cruxeval              hand-written code tasks (stdin/stdout tests; output prediction)
    tiny://gpqa                               hand-written multiple choice in GPQA's column layout

Model URIs resolve to a directory in the cache (``$INTRINSIC_CACHE``, default
``~/.cache/intrinsic``), keyed by a hash of every option, so everything downstream loads
them with the ordinary ``from_pretrained`` path.
"""

from .uri import (
    TinyURIError,
    is_tiny,
    parse_dataset_uri,
    parse_model_uri,
    resolve_tiny_dataset,
    resolve_tiny_model,
)

__all__ = [
    "TinyURIError",
    "is_tiny",
    "parse_dataset_uri",
    "parse_model_uri",
    "resolve_tiny_dataset",
    "resolve_tiny_model",
]
