# make run: start valet with config.yaml.  make test: run the test suite.
# Both first create a local virtual environment (.venv) holding PyYAML and pytest.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "PyYAML>=5.4" "pytest>=7"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python valet.py --config config.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q test_valet.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ valet.db valet.db-wal valet.db-shm
