# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of this torch lies on the development machines' disk; a GPU machine may pass its own.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install postgres test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[ml,demo,dev]"
	touch $@

install: $(STAMP)

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

test: install postgres
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=10

demo: install
	$(BIN)/nextturn demo

bench: install
	$(BIN)/python bench/event_log.py
	$(BIN)/python bench/signals_throughput.py
	$(BIN)/python bench/trainer_step.py
	$(BIN)/python bench/hot_swap.py

clean:
	rm -rf $(VENV) .nextturn .pytest_cache .hypothesis
