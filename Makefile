# make install: a virtual environment with the requirements; make test: install, then run the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install test
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt pytest
	touch $@

test: install
	$(PY) -m pytest -q tests
