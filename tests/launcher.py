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


def accelerate_launch(engine: str | Path, *args: str, num_processes: int = 2, timeout: int = 900
                      ) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch/accelerate/<engine>.yaml --num_processes N <args>``
    (``engine`` may also be the path of any accelerate config)."""
    config = engine if isinstance(engine, Path) else LAUNCH_CONFIGS / f"{engine}.yaml"
    return run_module(
        "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *args, timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the end of the launch's log when any rank failed."""
    assert result.returncode == 0, result.stdout[-2000:] + "\n" + result.stderr[-6000:]
    return result


def deepspeed_variant(engine: str, directory: Path, **zero_optimization) -> Path:
    """An accelerate config equal to ``launch/accelerate/<engine>.yaml`` but for extra
    ``zero_optimization`` keys, through a DeepSpeed JSON file (which the yaml's inline keys cannot set).

    Tiny models need ``stage3_param_persistence_threshold=0``: DeepSpeed keeps every parameter
    under 100,000 elements whole on every rank, i.e. all of a tiny model, so ZeRO-3 would shard nothing.
    """
    import yaml

    base = yaml.safe_load((LAUNCH_CONFIGS / f"{engine}.yaml").read_text())
    ds = base.pop("deepspeed_config")
    offload = {key: {"device": ds[f"{key}_device"]} for key in ("offload_optimizer", "offload_param")}
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": ds["gradient_accumulation_steps"],
              "gradient_clipping": ds["gradient_clipping"], "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "zero_optimization": {"stage": ds["zero_stage"], **offload,
                                    "stage3_gather_16bit_weights_on_model_save": ds.get("zero3_save_16bit_model", False),
                                    **zero_optimization}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{engine}.json").write_text(json.dumps(config, indent=2))
    base["deepspeed_config"] = {"deepspeed_config_file": str(directory / f"{engine}.json"),
                                "deepspeed_multinode_launcher": ds["deepspeed_multinode_launcher"],
                                "zero3_init_flag": ds["zero3_init_flag"]}
    path = directory / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def launch_recipe(recipe: str, config: str | Path, engine: str | Path = "ddp", *overrides: str, num_processes: int = 2,
                  timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``recipes.<recipe> --config <config> <overrides>`` on ``num_processes`` CPU processes; it must succeed."""
    return check(accelerate_launch(engine, "-m", f"recipes.{recipe}", "--config", str(ROOT / config), *overrides,
                                   num_processes=num_processes, timeout=timeout))


def trainer_state(checkpoint: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint directory."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())



def untie_embeddings(model_dir: str | Path, target: str | Path) -> str:
    """Save a copy of a tied-embedding causal LM with its own LM head (same function, untied weights).

    Qwen2.5-7B/14B have a separate LM head; under ZeRO-3 it is gathered only by its own forward, so
    reading it anywhere else must gather it explicitly. A tied head stays gathered with the input
    embeddings and would hide a missing gather.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return str(target)
