# make demo | make zoo | make test — each sets up .venv on first use (torch 2.13.0 first: no CUDA pull on CPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo zoo test list clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# DeepSpeed builds from source against the torch above (no CUDA ops; pin as in pyproject's extra)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "deepspeed>=0.19,<0.20"
	$(BIN)/python -m pip install --quiet -e ".[test,deepspeed]"
	touch $(STAMP)

setup: $(STAMP)

# the label-free zoo, compact: GRPO-gold, Intuitor, TTRL, IC-weighted vote and self-improvement, one seed,
# 30 steps (outputs/zoo/tiny_compact: zoo.md, zoo.json, plots/)
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m recipes.zoo --config configs/zoo/tiny.yaml --compact

# the full zoo tables (every method, 3 seeds) at lr 5e-5 and 5e-6, and the reference's lr sweep; cached
# per (method, seed, config), so a re-run computes only what is missing
zoo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m recipes.zoo --config configs/zoo/tiny.yaml
	HF_HUB_OFFLINE=1 $(BIN)/python -m recipes.zoo --config configs/zoo/tiny_lr5e-6.yaml
	HF_HUB_OFFLINE=1 $(BIN)/python -m recipes.zoo --config configs/zoo/tiny_lr_sweep.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

list: setup
	$(BIN)/python -m recipes list

clean:
	rm -rf $(VENV) outputs
