"""The one error a wrong config gives, and which file set each key.

Every problem found while loading or checking a config is a :class:`ConfigError`, printed by the
command line as one line that names the file (or ``command line``), the key path, what was
expected and the closest valid key. ``origins`` maps a key path (a tuple of names) to the file or
``command line`` that set it last; :func:`origin_of` reads it for a dotted key.
"""

from __future__ import annotations

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config problem, rendered as ``file: key: problem (did you mean 'x'?)``."""

    def __init__(self, source: str, key: str, problem: str, suggestion: str | None = None):
        self.source, self.key, self.problem, self.suggestion = source, key, problem, suggestion
        hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
        super().__init__(f"{source}: {key or '<root>'}: {problem}{hint}")


def key_parts(key: str) -> tuple[str, ...]:
    """``rewards[1].kwargs`` -> ``('rewards', '1', 'kwargs')``."""
    return tuple(p for p in key.replace("[", ".").replace("]", "").split(".") if p)


def origin_of(origins: dict[tuple, str], key: str) -> str:
    """The file (or ``command line``) that set ``key`` or, failing that, its closest parent."""
    parts = key_parts(key)
    while parts and parts not in origins:
        parts = parts[:-1]
    return origins.get(parts, origins.get((), "config"))


def section_named(err: Exception, values: dict) -> str:
    """The key a section's own check names first in its message (``decred.layers must ...``), or ''."""
    word = (str(err).split() or [""])[0].rstrip(":,")
    return word if word.split(".")[0] in values else ""
