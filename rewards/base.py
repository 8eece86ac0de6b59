"""Reward base class and registry.

A reward is a small picklable callable class following TRL's reward-function protocol:
``reward(prompts=..., completions=..., **dataset_columns) -> list[float | None]``, with a
``__name__`` (TRL logs ``rewards/<name>/mean``). Subclassing :class:`Reward` registers the
class under its ``name`` (default: the class name in snake_case), so configs can name it;
a class anywhere else is reachable by dotted path (``my_pkg.rewards.Brevity``).

>>> class Brevity(Reward):
...     '''1 for a completion of at most ``limit`` characters.'''
...     def __init__(self, limit: int = 10):
...         self.limit = limit
...     def score(self, completion, **row):
...         return float(len(completion) <= self.limit)
>>> Brevity(limit=3)(prompts=["1+1="], completions=["2", "2222"])
[1.0, 0.0]
>>> get_reward_class("brevity") is Brevity
True
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Any, ClassVar

REGISTRY: dict[str, type[Reward]] = {}


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m["content"] if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Reward:
    """Base of every reward. Override :meth:`score` (one completion) or ``__call__`` (a batch)."""

    name: ClassVar[str] = ""
    needs_whole_group: ClassVar[bool] = False
    """True for rewards that compare a completion with the rest of its group (a vote): each call must
    see every completion of a prompt, so the trainer refuses a layout that splits groups over processes."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        if not cls.__dict__.get("abstract", False):
            REGISTRY[cls.name] = cls

    @property
    def __name__(self) -> str:  # TRL reads reward_func.__name__ for its metric names
        return self.name

    def score(self, completion: str, **row: Any) -> float | None:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or __call__()")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        rows = [
            {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            for i in range(len(completions))
        ]
        return [self.score(completion_text(c), **row) for c, row in zip(completions, rows)]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class UnknownRewardError(LookupError):
    """A reward name that is neither registered nor an importable dotted path."""


def get_reward_class(name: str) -> type:
    """The reward class registered as ``name``, or the class at dotted path ``name``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownRewardError(f"cannot import reward {name!r} ({err})") from None
        if not callable(obj):
            raise UnknownRewardError(f"{name!r} is not callable")
        return obj
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f"closest: {close[0]!r}" if close else f"registered: {', '.join(sorted(REGISTRY))}"
    raise UnknownRewardError(f"unknown reward {name!r} ({hint}; or give a dotted path)")


def build_reward(name: str, **kwargs: Any):
    """Instantiate a reward by registered name or dotted path with keyword arguments."""
    cls = get_reward_class(name)
    return cls(**kwargs) if isinstance(cls, type) else cls
