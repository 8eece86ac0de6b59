"""configs/alol/llama-7b_hh.yaml: its provenance table (docs/METHODS.md §7, compared key by key with
the resolved config in tests/test_paper_configs.py) names the reference where the reference is meant."""

from __future__ import annotations

from tests.test_paper_configs import TABLES, rows

CONFIG = "configs/alol/llama-7b_hh.yaml"


def test_the_hh_config_has_a_provenance_table():
    assert CONFIG in TABLES and len(TABLES[CONFIG]) > 50


def test_table_rows_are_the_references_where_it_says_so():
    """The layout, stop rule and value-head rows name LoL-RL's script or its utils, not the project."""
    table = rows(CONFIG)
    for key in ("trainer.prompt_preamble", "trainer.prompt_replace", "trainer.stop_strings", "trainer.response_cut",
                "trainer.max_prompt_length", "trainer.max_completion_length", "trainer.baseline_priority_sampling",
                "trainer.value_select", "trainer.value_val_fraction", "trainer.value_epochs"):
        assert table[key][1].startswith("`lolrl…`"), key
    for key in ("trainer.value_head", "trainer.value_num_heads", "trainer.value_dropout"):
        assert "utils/rl_utils.py" in table[key][1], key
