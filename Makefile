# Open-Llama: every target does its own set-up, so `make test` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On a machine without a GPU outside this project's CI, pass the CPU wheel index, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: setup test lint format bench demo clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-distributed.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	# DeepSpeed builds against the torch above; build isolation would fetch another torch.
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements-distributed.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python bench/run_all.py

demo: setup
	$(BIN)/python demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
