# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch and torchvision are installed first and pinned together (PyPI's torchvision loads only beside
# the torch build it was made for), so that no later install swaps either. The build is PyPI's
# (CUDA libraries included, a 6.7 GB environment); it runs on CPU-only machines. For a 1.4 GB
# CPU-only environment: `make TORCH_SPEC=torch==2.13.0 ...` (the torchvision tests then skip).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip freeze | grep -iE '^(torch|torchvision)==' | sed 's/+.*//' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,rl,bench]"
	$(BIN)/python -m pip install --quiet --no-deps "kronfluence==1.0.1"
	# a torchvision that cannot load beside this torch (pulled in by a peer) would break transformers' import
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip uninstall --quiet -y torchvision 2>/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_ksm.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/surrogates.py

clean:
	rm -rf $(VENV) build *.egg-info
