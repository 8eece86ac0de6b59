"""Group rewards across processes: a layout that can split a group over processes is refused at startup."""

import pytest
import torch

from recipes.common.cli import main
from recipes.rlif import RLIFRecipeConfig, run
from rewards import (ConsistencyVote, InternalConsistency, MajorityVote, MathAccuracy, SelfCertainty, group_rows)
from tests.conftest import ROOT
from tests.launcher import accelerate_launch, launch_recipe
from trainers import RLIFConfig, RLIFTrainer
from trainers.rlif import group_layout_problem, groups_split, whole_group_rewards

SMALL = dict(output_dir="unused", bf16=False, use_cpu=True, report_to=[], max_completion_length=4)


def test_groups_split_follows_trl_sharding():
    # brute force TRL's layout: RepeatSampler rows (each prompt G times) dealt in consecutive slices
    # of rows_per_process to the processes, round robin (accelerate's batch sharding)
    for world in (1, 2, 3):
        for group in (2, 3, 4, 8):
            for rows in range(1, 25):
                total = rows * world * group  # a generation batch that TRL accepts (a multiple of G)
                prompt_of_row = [r // group for r in range(total)]
                slices = [prompt_of_row[p * rows : (p + 1) * rows] for p in range(world * group)]
                owners = {}
                for s, rows_of_slice in enumerate(slices):
                    for prompt in rows_of_slice:
                        owners.setdefault(prompt, set()).add(s % world)
                split = any(len(o) > 1 for o in owners.values())
                assert groups_split(rows, group, world) == split, (world, group, rows)


def test_whole_group_rewards():
    funcs = [MajorityVote(), ConsistencyVote(mode="soft"), InternalConsistency(mode="candidates"),
             InternalConsistency(mode="hard"), SelfCertainty(), MathAccuracy(), lambda **kw: [0.0]]
    assert whole_group_rewards(funcs) == ["majority_vote", "consistency_vote", "internal_consistency"]
    assert MajorityVote.needs_whole_group and ConsistencyVote.needs_whole_group
    assert not SelfCertainty.needs_whole_group and not MathAccuracy.needs_whole_group


@pytest.fixture
def two_processes(monkeypatch):
    """A simulated 2-process launch, as far as the configs (TRL's own checks) and the layout check can tell."""
    monkeypatch.setattr(RLIFConfig, "world_size", property(lambda self: 2))


def test_layout_problem_names_the_fix(two_processes):
    args = RLIFConfig(per_device_train_batch_size=6, num_generations=4, **SMALL)
    option, problem = group_layout_problem(args, [MajorityVote()], world_size=2)
    assert option == "per_device_train_batch_size"
    assert "majority_vote" in problem and "set per_device_train_batch_size=8" in problem and "\n" not in problem
    assert group_layout_problem(args, [MajorityVote()], world_size=1) is None  # one process holds everything
    assert group_layout_problem(args, [SelfCertainty(), MathAccuracy()], world_size=2) is None  # no group reward
    # 6 x 2 = 12 rows per process: whole groups of 4
    args = RLIFConfig(per_device_train_batch_size=6, num_generations=4, steps_per_generation=2, **SMALL)
    assert group_layout_problem(args, [MajorityVote()], world_size=2) is None
    args = RLIFConfig(per_device_train_batch_size=2, num_generations=8, steps_per_generation=2, **SMALL)
    assert group_layout_problem(args, [InternalConsistency(mode="candidates")])[1].endswith(
        "set per_device_train_batch_size=4")
    # evaluation batches are dealt the same way
    args = RLIFConfig(per_device_train_batch_size=8, num_generations=4, per_device_eval_batch_size=6,
                      eval_strategy="steps", eval_steps=1, **SMALL)
    assert group_layout_problem(args, [ConsistencyVote()], world_size=2)[0] == "per_device_eval_batch_size"


def test_trainer_refuses_before_the_model_loads(two_processes, tmp_path):
    args = RLIFConfig(per_device_train_batch_size=6, num_generations=4, **SMALL)
    expected = r"^per_device_train_batch_size: majority_vote .* set per_device_train_batch_size=8$"
    with pytest.raises(ValueError, match=expected):
        RLIFTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=[MajorityVote()], args=args)


def test_recipe_refuses_in_one_error_line(two_processes, tmp_path, capsys, tiny_model_dir, monkeypatch):
    config = ROOT / "configs/rlif/tiny_arithmetic_ttrl.yaml"

    def no_trainer(*args, **kwargs):
        raise AssertionError("the trainer (and its model) must not be built")

    monkeypatch.setattr("recipes.rlif.RLIFTrainer", no_trainer)
    with pytest.raises(SystemExit) as exit_:
        main("rlif", RLIFRecipeConfig, run, [
            "--config", str(config), f"model.name_or_path={tiny_model_dir}", f"trainer.output_dir={tmp_path}",
            "trainer.per_device_train_batch_size=12", "trainer.num_generations=8"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {config}: trainer.per_device_train_batch_size: majority_vote")
    assert lines[-1].endswith("set per_device_train_batch_size=16"), lines


def test_two_process_launch_refuses_a_split_layout_and_votes_over_whole_groups(tmp_path, tiny_model_dir):
    config = tmp_path / "ttrl.yaml"
    config.write_text(f"""base: [{ROOT / 'configs/rlif/tiny_arithmetic_ttrl.yaml'}]
rewards:
  - {{name: majority_vote, weight: 1.0}}
  - {{name: tests.signal_probe.RecordSignals, weight: 0.0,
      kwargs: {{directory: {tmp_path / 'probe'}, signals: [entropy]}}}}
""")
    common = ["--config", str(config), f"model.name_or_path={tiny_model_dir}", "trainer.max_steps=1",
              "trainer.num_generations=4", "data.eval_split=null"]
    refused = accelerate_launch("ddp", "-m", "recipes.rlif", *common, f"trainer.output_dir={tmp_path / 'no'}",
                                "trainer.per_device_train_batch_size=6")
    assert refused.returncode != 0
    assert "trainer.per_device_train_batch_size: majority_vote" in refused.stderr
    assert "set per_device_train_batch_size=8" in refused.stderr
    assert not (tmp_path / "probe").exists()  # refused before anything was scored

    launch_recipe("rlif", config, "ddp", *common[2:], f"trainer.output_dir={tmp_path / 'ok'}",
                  "trainer.per_device_train_batch_size=8", "trainer.steps_per_generation=1")
    records = [torch.load(path, weights_only=False) for path in sorted((tmp_path / "probe").glob("rank*_call0.pt"))]
    assert [r["world_size"] for r in records] == [2, 2]
    for record in records:  # each rank scored 2 whole groups of 4: every vote saw its whole group
        assert [len(rows) for rows in group_rows(record["prompts"])] == [4, 4]
    assert {p for r in records for p in r["prompts"]}.__len__() == 4  # 4 distinct prompts over the 2 ranks
