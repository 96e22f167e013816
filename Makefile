# Every target creates .venv and installs the project into it first, so each is one command
# on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit bench bench-rotation clean bench-scale bench-hostile bench-vault-poll system-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "dvs-agent needs Python 3.11 or newer" or 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvs-agent dev

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench
	$(BIN)/ruff format --check agent tests bench

typecheck: $(STAMP)
	$(BIN)/mypy agent

unit: $(STAMP)
	$(BIN)/pytest

# Debian packages the tests need: faketime (libfaketime steps the running daemon's wall clock).
# Installed when missing and running as root (CI); otherwise those tests say what is missing.
system-deps:
	@if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q faketime >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }; \
	  else echo "note: the Debian package faketime is not installed: clock-step tests skip"; fi; \
	fi

unit: system-deps

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/compare.py

bench-rotation: $(STAMP)
	$(BIN)/python bench/rotation_latency.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/scale.py --secret-files

bench-hostile: $(STAMP)
	$(BIN)/python bench/hostile.py

bench-vault-poll: $(STAMP)
	$(BIN)/python bench/vault_poll.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
