# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so that no later install swaps it for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print(torch.__version__)" | sed 's/+.*//' | sed 's/^/torch==/' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,rl,bench]"
	$(BIN)/python -m pip install --quiet --no-deps "kronfluence==1.0.1"
	$(BIN)/python -m pip uninstall --quiet -y torchvision 2>/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_ksm.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/surrogates.py

clean:
	rm -rf $(VENV) build *.egg-info
