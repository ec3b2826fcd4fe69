# `make test` and `make book` create .venv on first use and install the package with its extras.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= smoke

.PHONY: venv test lint book bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

book: venv
	$(BIN)/python -m collapse_utils run --profile $(PROFILE)

bench: venv
	$(BIN)/python -m collapse_utils.bench

clean:
	rm -rf _build book/_executed outputs/smoke
