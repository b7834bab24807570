# `make demo`, `make test` and `make ablations` (the paper's ablations on the synthetic language,
# 3 seeds: much longer than the demo). Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo ablations clean

install: $(STAMP)

# Re-installs only when a requirements file changes. torch goes first and alone, so the
# pinned CPU wheel is taken instead of a multi-GB CUDA build pulled in as a dependency.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $$(grep -E '^torch==' requirements.txt)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) demo.py --out=out/demo

ablations: install
	$(PY) ablations.py --out=out/ablations

clean:
	rm -rf out .pytest_cache
