"""Offline, CPU-only test session: tiny models are built once per session into a temp cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A small, fast warm-up shared by the tests that need a partly competent model.
TEST_WARMUP = "tiny://qwen2-arith?layers=2&hidden=64&heads=4&kv_heads=2&intermediate=256&steps=1000&lr=3e-3&schedule=cosine"


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Every tiny:// model of the session goes to one temp cache (kept across the session)."""
    path = os.environ.get("INTRINSIC_TEST_CACHE") or str(tmp_path_factory.mktemp("intrinsic-cache"))
    os.environ["INTRINSIC_CACHE"] = path
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache) -> str:
    """A random-init tiny Qwen2 saved as a directory."""
    from recipes.common.tiny import resolve_tiny_model

    return resolve_tiny_model("tiny://qwen2?layers=2&hidden=64&intermediate=256")


@pytest.fixture(scope="session")
def warm_model_dir(tiny_cache) -> str:
    """A tiny Qwen2 after a short supervised warm-up on 2-digit addition."""
    from recipes.common.tiny import resolve_tiny_model

    return resolve_tiny_model(TEST_WARMUP)


def run_module(*args: str, cwd: Path = ROOT, timeout: int = 600, **kwargs):
    """``python -m <args>`` in a subprocess with the test environment; returns CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
