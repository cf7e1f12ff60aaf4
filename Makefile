# The two commands of README.md: `make demo` runs the default pipeline, `make test` runs the test suite.
# Both create .venv (Python 3.11) and install the pinned project into it first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install down clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tes demo

test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

down: $(STAMP)
	$(VENV)/bin/tes down

clean:
	rm -rf $(VENV) .tes runs
