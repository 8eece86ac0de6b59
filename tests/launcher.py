"""Multi-process test helpers: ``accelerate launch`` on CPU with one of the repo's launch configs.

Shared by every multi-process test (DDP, DeepSpeed ZeRO-2/3; the recipes of other trainers reuse it)::

    out = launch_recipe("rlif", "configs/rlif/tiny_arithmetic_ic.yaml", "zero3", "trainer.max_steps=1")

Each launch gets a free TCP port for its rendezvous, so tests collide neither with each other nor
with another job on the machine. The configs carry no ``mixed_precision``: precision follows the
recipe's ``trainer.bf16`` (false in the tiny configs), which DeepSpeed on CPU needs. DeepSpeed on
CPU JIT-compiles one communication op the first time it runs on a machine (~70 s, cached in
``~/.cache/torch_extensions``); the default timeout allows for it.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.conftest import ROOT, run_module

LAUNCH_CONFIGS = ROOT / "launch" / "accelerate"


def free_port() -> int:
    """A TCP port nobody listens on right now (for ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(engine: str, *args: str, num_processes: int = 2, timeout: int = 900
                      ) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch/accelerate/<engine>.yaml --num_processes N <args>``."""
    return run_module(
        "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / f"{engine}.yaml"),
        "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *args, timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the end of the launch's log when any rank failed."""
    assert result.returncode == 0, result.stdout[-2000:] + "\n" + result.stderr[-6000:]
    return result


def launch_recipe(recipe: str, config: str | Path, engine: str = "ddp", *overrides: str, num_processes: int = 2,
                  timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``recipes.<recipe> --config <config> <overrides>`` on ``num_processes`` CPU processes; it must succeed."""
    return check(accelerate_launch(engine, "-m", f"recipes.{recipe}", "--config", str(ROOT / config), *overrides,
                                   num_processes=num_processes, timeout=timeout))


def trainer_state(checkpoint: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint directory."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
