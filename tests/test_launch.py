"""Recipes under ``accelerate launch`` with the repo's launch configs: 2 CPU processes (gloo) as one job.

* every file in ``launch/accelerate/`` passes accelerate's own launch validation and builds its plugin;
* DDP: SFT and RLIF train, save and evaluate; the rewards TRL gathers over ranks equal a
  single-process computation on the same completions;
* DeepSpeed ZeRO-2, ZeRO-3 and FSDP2: two RLIF steps; the per-token internal signals every rank computed
  (self-certainty through the fused head, internal consistency through the logit lens, whose
  norm and head live outside the forward) equal a full-softmax single-process reference; the
  saved model reloads and equals the checkpoint's; the main process evaluates after training.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards import InternalConsistency, SelfCertainty
from tests.conftest import ROOT
from tests.launcher import LAUNCH_CONFIGS, deepspeed_variant, launch_recipe, trainer_state, untie_embeddings
from tests.signal_probe import load_records, reference_signals

TEMPERATURE = 0.9  # configs/base/tiny_rlif.yaml


# -- the launch configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["single", "ddp", "zero2", "zero3", "zero3_offload", "fsdp2"])
def test_launch_config_passes_accelerate_validation(name):
    """What ``accelerate launch`` does before starting processes, and the plugin each process builds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = LAUNCH_CONFIGS / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "16", "-m",
                                                "recipes.rlif", "--config", "c.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    assert defaults is not None and args.num_processes == 16  # --num_processes overrides the file
    # precision is the recipe's (trainer.bf16): a config that forced it would disagree with tiny/fp32 recipes
    assert defaults.mixed_precision is None and not mixed_precision_from_config
    saved = dict(os.environ)
    try:
        if name.startswith("zero"):
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            os.environ.update(prepare_deepspeed_cmd_env(args)[1])
            config = DeepSpeedPlugin().deepspeed_config
            zero = config["zero_optimization"]
            assert zero["stage"] == (2 if name == "zero2" else 3)
            for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "gradient_clipping"):
                assert config[key] == "auto", key
            offload = "cpu" if name == "zero3_offload" else "none"
            assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
            assert zero["stage3_gather_16bit_weights_on_model_save"] == (name != "zero2")
        elif name == "fsdp2":
            os.environ.update(prepare_multi_gpu_env(args))
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is not None
            assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_slurm_script_syntax_and_dry_run():
    script = ROOT / "launch" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHON": sys.executable}

    def dry(*args):
        out = subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True, text=True, env=env,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return out.stdout

    two = dry("--nodes", "2", "--gpus-per-node", "8", "intuitor", "configs/intuitor/qwen2.5-7b_math.yaml",
              "trainer.learning_rate=1e-6")
    launches = [line for line in two.splitlines() if "accelerate launch" in line]
    assert len(launches) == 2, two
    for rank, line in enumerate(launches):
        assert f"--machine_rank {rank}" in line and "--num_machines 2" in line and "--num_processes 16" in line
        assert "--rdzv_backend c10d" in line and "--main_process_ip node-0" in line
        assert line.endswith("-m recipes.intuitor --config configs/intuitor/qwen2.5-7b_math.yaml "
                             "trainer.learning_rate=1e-6"), line
    assert "vllm-serve" not in two
    # what a node would run is a valid accelerate launch command line
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(launches[1].split(": ", 1)[1].split()[2:])
    args, defaults, _ = _validate_launch_command(args)
    assert (args.machine_rank, args.num_machines, args.num_processes) == (1, 2, 16) and args.use_deepspeed

    three = dry("--nodes", "3", "--gpus-per-node", "8", "--vllm-node", "intuitor", "configs/intuitor/qwen2.5-7b_math.yaml")
    launches = [line for line in three.splitlines() if "accelerate launch" in line]
    serve = [line for line in three.splitlines() if "trl vllm-serve" in line]
    assert len(launches) == 2 and len(serve) == 1, three
    assert serve[0].startswith("node-2:") and "--model Qwen/Qwen2.5-7B" in serve[0]
    assert all("--num_processes 16" in line and "trainer.use_vllm=true" in line and "trainer.vllm_mode=server" in line
               and "trainer.vllm_server_host=node-2" in line for line in launches)

    one = dry("--nodes", "1", "--gpus-per-node", "8", "--vllm-gpus", "2", "intuitor",
              "configs/intuitor/qwen2.5-3b_math.yaml")
    launches = [line for line in one.splitlines() if "accelerate launch" in line]
    serve = [line for line in one.splitlines() if "trl vllm-serve" in line]
    assert len(launches) == 1 and "--num_processes 6" in launches[0] and "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5" in launches[0]
    assert len(serve) == 1 and "CUDA_VISIBLE_DEVICES=6,7" in serve[0] and "--data-parallel-size 2" in serve[0]


# -- multi-process runs ---------------------------------------------------------------------------

def test_sft_under_two_process_accelerate_launch(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    launch_recipe("sft", "configs/sft/tiny_arithmetic.yaml", "ddp", f"model.name_or_path={tiny_model_dir}",
                  "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=8",
                  f"trainer.output_dir={out}", "eval.max_rows=8", "eval.before_training=false",
                  "trainer.save_strategy=steps", "trainer.save_steps=4")
    state = trainer_state(out / "checkpoint-4")
    assert state["global_step"] == 4
    # one job over two ranks: 4 steps x 8 rows x 2 processes of the 20,000 training rows
    assert abs(state["epoch"] - 4 * 8 * 2 / 20000) < 1e-6, state["epoch"]
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert (out / "eval.json").exists()


PROBED = """base: [{base}]
rewards:
  - {{name: math_accuracy, weight: 1.0}}
  - {{name: internal_consistency, weight: 0.5, kwargs: {{mode: soft}}}}
  - {{name: self_certainty, weight: 0.1}}
  - {{name: tests.signal_probe.RecordSignals, weight: 0.0, kwargs: {{directory: {probe}}}}}
"""


def probed_rlif_run(engine, tmp_path, model_dir: str, *overrides: str):
    """Two RLIF steps (GRPO-gold + IC soft + self-certainty, every rank recording what it scored)."""
    probe, out = tmp_path / "probe", tmp_path / "out"
    config = tmp_path / "probed.yaml"
    config.write_text(PROBED.format(base=ROOT / "configs/rlif/tiny_arithmetic_ic.yaml", probe=probe))
    launch_recipe("rlif", config, engine, f"model.name_or_path={model_dir}", "trainer.max_steps=2",
                  "trainer.per_device_train_batch_size=8", "trainer.num_generations=4", "trainer.logging_steps=1",
                  f"trainer.output_dir={out}", "trainer.save_strategy=steps", "trainer.save_steps=2",
                  "eval.max_rows=8", *overrides)
    return probe, out


def check_signals_against_single_process(probe, model_dir: str, rows_per_rank: int = 8) -> list[dict]:
    """Every rank's per-token signals at step 1 (initial weights) vs the single-process reference."""
    records = load_records(probe, call=0)
    assert [r["world_size"] for r in records] == [2, 2]
    assert [len(r["completion_ids"]) for r in records] == [rows_per_rank] * 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    references, certainty, consistency = [], [], []
    for record in records:
        for prompt, ids, got in zip(record["prompts"], record["completion_ids"], record["token_signals"]):
            ref = reference_signals(model, tokenizer, prompt, ids, TEMPERATURE, got["ic_layers"])
            assert got["self_certainty"].shape == ref["self_certainty"].shape
            assert got["ic_soft"].shape == ref["ic_soft"].shape
            certainty.append((got["self_certainty"].double() - ref["self_certainty"]).abs().max().item())
            if ref["ic_soft"].numel():
                consistency.append((got["ic_soft"].double() - ref["ic_soft"]).abs().max().item())
            references.append({**got, **{k: v.float() for k, v in ref.items()}})
    assert max(certainty) < 1e-4, max(certainty)
    assert consistency and max(consistency) < 1e-5, max(consistency)
    # the comparison can fail: the values vary far more than the tolerance
    sc = torch.cat([r["self_certainty"] for r in references])
    ic = torch.cat([r["ic_soft"].flatten() for r in references])
    assert sc.max() - sc.min() > 1e-2 and ic.max() - ic.min() > 1e-2, (sc, ic)
    return references


def check_gathered_rewards(out, references: list[dict]) -> None:
    """TRL's step-1 reward means are over both ranks' completions: equal to the reference's."""
    logged = next(h for h in trainer_state(out / "checkpoint-2")["log_history"] if h.get("step") == 1)
    expected = {"self_certainty": SelfCertainty(), "internal_consistency": InternalConsistency(mode="soft")}
    for name, reward in expected.items():
        values = [v for v in reward([""] * len(references), [""] * len(references), token_signals=references)
                  if v is not None]
        assert len(values) == len(references)
        assert math.isclose(logged[f"rewards/{name}/mean"], sum(values) / len(values), abs_tol=1e-4), name


def check_saved_model(out, model_dir: str) -> None:
    """The saved model reloads, equals the checkpoint's, and two optimizer steps moved it."""
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2", dtype=torch.float32).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert saved.keys() == initial.keys()
    assert all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert max((saved[k] - initial[k]).abs().max().item() for k in saved) > 0
    assert trainer_state(out / "checkpoint-2")["global_step"] == 2
    assert (out / "eval.json").exists()  # the main process evaluated after training


def test_rlif_ddp_gathered_rewards_equal_single_process(tmp_path, warm_model_dir):
    probe, out = probed_rlif_run("ddp", tmp_path, warm_model_dir)
    references = check_signals_against_single_process(probe, warm_model_dir)
    check_gathered_rewards(out, references)
    check_saved_model(out, warm_model_dir)


def test_rlif_zero2_signals_equal_single_process_and_checkpoint_reloads(tmp_path, warm_model_dir):
    probe, out = probed_rlif_run("zero2", tmp_path, warm_model_dir)
    check_signals_against_single_process(probe, warm_model_dir)
    check_saved_model(out, warm_model_dir)


def test_rlif_zero3_signals_equal_single_process_and_checkpoint_reloads(tmp_path, warm_model_dir):
    """Every parameter sharded (persistence threshold 0: a tiny model's would otherwise all stay whole)
    and the LM head untied (as in Qwen2.5-7B/14B): the signal hook and the lens read norm and head
    outside their own forward and must gather them. One generation serves both steps, so the
    signals ride on TRL's own old-log-prob pass (the other code path)."""
    model_dir = untie_embeddings(warm_model_dir, tmp_path / "untied")
    engine = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0,
                               stage3_prefetch_bucket_size=0)
    probe, out = probed_rlif_run(engine, tmp_path, model_dir, "trainer.steps_per_generation=2",
                                 "eval.before_training=true")
    references = check_signals_against_single_process(probe, model_dir, rows_per_rank=16)
    check_gathered_rewards(out, references)
    check_saved_model(out, model_dir)
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's sharded states, for resuming
    # the main process evaluated whole copies (the model it holds is a shard) before and after
    report = json.loads((out / "eval.json").read_text())
    assert report["before"]["rows"] == report["after"]["rows"] == 8


def test_rlif_fsdp2_signals_equal_single_process_and_checkpoint_reloads(tmp_path, warm_model_dir):
    """FSDP2 (fully_shard per decoder layer; norm and head in the root group) gives the same numbers."""
    probe, out = probed_rlif_run("fsdp2", tmp_path, warm_model_dir)
    references = check_signals_against_single_process(probe, warm_model_dir)
    check_gathered_rewards(out, references)
    check_saved_model(out, warm_model_dir)


def test_rlif_zero3_signals_from_generation_equal_single_process(tmp_path, warm_model_dir):
    """ZeRO-3, sharded untied head, no TRL pass (one step per generation): the signals and lens states
    come from generation's own forwards (RLIF's ``generation`` route) and the head is gathered again
    for the projection after generation; the numbers equal the single-process reference."""
    model_dir = untie_embeddings(warm_model_dir, tmp_path / "untied")
    engine = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0,
                               stage3_prefetch_bucket_size=0)
    probe, out = tmp_path / "probe", tmp_path / "out"
    config = tmp_path / "probed.yaml"
    config.write_text(PROBED.format(base=ROOT / "configs/rlif/tiny_arithmetic_ic.yaml", probe=probe))
    result = launch_recipe("rlif", config, engine, f"model.name_or_path={model_dir}", "trainer.max_steps=2",
                           "trainer.per_device_train_batch_size=8", "trainer.num_generations=4",
                           "trainer.logging_steps=1", f"trainer.output_dir={out}", "trainer.save_strategy=steps",
                           "trainer.save_steps=2",
                           "eval.max_rows=8", "eval.before_training=false")
    logs = result.stdout + result.stderr
    assert logs.count("RLIF internal signals: generation") == 2, logs[-3000:]  # once per process
    assert "generation capture failed" not in logs and "would hold" not in logs
    references = check_signals_against_single_process(probe, model_dir)
    check_gathered_rewards(out, references)
