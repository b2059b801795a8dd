# HistoMoE: `make book` builds the whole book on her2st; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= her2st
# Local mirror directories checked before the network (os.pathsep-separated); here, the shared data folder.
export HISTOMOE_MIRRORS ?= $(abspath $(CURDIR)/../shared/data)
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test book book-smoke clean-book bench-embed

venv: $(STAMP)

$(STAMP): pyproject.toml tools/install_venv.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv with pip's own settings (indexes, find-links, constraints); pip itself when uv cannot be had
	$(BIN)/python tools/install_venv.py '.[test]'
	@# byte-compile on every core (pip does it on one); files that are not Python 3 (packages' fixtures) are skipped
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

book: $(STAMP)
	$(BIN)/histomoe book --profile $(PROFILE) --keep-going

book-smoke: $(STAMP)
	$(BIN)/histomoe book --profile smoke --keep-going

clean-book:
	rm -rf book/_build book/_executed
