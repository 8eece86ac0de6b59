# make demo | make test — each sets up .venv on first use (torch 2.13.0 first: no CUDA pull on CPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test list clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# DeepSpeed builds from source against the torch above (no CUDA ops; pin as in pyproject's extra)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "deepspeed>=0.19,<0.20"
	$(BIN)/python -m pip install --quiet -e ".[test,deepspeed]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m recipes.intuitor --config configs/intuitor/tiny_arithmetic.yaml
	$(BIN)/python -m recipes.rlif --config configs/rlif/tiny_arithmetic_gold.yaml
	$(BIN)/python -m recipes.evaluate --config configs/evaluate/tiny_rlif.yaml
	$(BIN)/python -m recipes.plot outputs/rlif/tiny_arithmetic_gold outputs/intuitor/tiny_arithmetic \
		outputs/evaluate/tiny_rlif --out outputs/plots

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

list: setup
	$(BIN)/python -m recipes list

clean:
	rm -rf $(VENV) outputs
