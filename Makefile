# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use with any Python 3.11+ (set PYTHON to choose one).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# The demo needs only the test servers: a newcomer's first `make demo` skips the dev tools.
DEMO_STAMP := $(VENV)/.installed-demo
# Pythons for the Django 6.x tox environments, through pyenv when it is there.
export PYENV_VERSION ?= $(shell pyenv versions --bare 2>/dev/null | grep -E '^3\.1[123]\.' | sort -V | awk -F. '!seen[$$1"."$$2]++' | paste -sd: -)

# Check the Python, then create .venv with an up-to-date pip if it is not there yet.
define make-venv
@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed: make PYTHON=python3.11 ...")'
test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
$(BIN)/python -m pip install -q --upgrade pip
endef

.PHONY: help demo test test-fast lint format type bench tox django61 clean

help:
	@echo "make demo    run the example project on local SMTP servers"
	@echo "make test    run the whole test suite"
	@echo "make lint    ruff check + format check;  make type  mypy"
	@echo "make bench   run the benchmarks and rewrite docs/performance.md"
	@echo "make tox     the Python x Django matrix (needs pyenv Pythons)"

$(STAMP): pyproject.toml
	$(make-venv)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	$(make-venv)
	$(BIN)/python -m pip install -q -e ".[testing]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m example_project.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

type: $(STAMP)
	$(BIN)/mypy robust_mail

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks

tox: $(STAMP)
	$(BIN)/python -m pip install -q "tox>=4"
	$(BIN)/tox $(TOX_ARGS)

# The suite on Django 6.1 / Python 3.12, as CI runs it.
django61: $(STAMP)
	$(BIN)/python -m pip install -q "tox>=4"
	$(BIN)/tox -e py312-django61

clean:
	rm -rf $(VENV) .tox build *.egg-info
