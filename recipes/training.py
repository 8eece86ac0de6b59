"""Small pieces every training recipe shares."""

from __future__ import annotations


def resume_argument(args) -> bool | str | None:
    """``trainer.resume_from_checkpoint``: ``true`` -> the last checkpoint, a path -> that one."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    return True if str(value).lower() == "true" else value
