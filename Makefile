# musicgen-lite: two commands for a fresh machine
#   make lab    install whatever is missing, then open JupyterLab on notebooks/
#   make test   install whatever is missing, then run the unit tests and every notebook (nbval, tiny scale)
# and behind them:
#   make setup      idempotent: .venv, torch pinned, torchaudio repaired on CPU, apt packages, pip install -e ".[dev]"
#   make demo       headless tour: renders captioned clips + spectrograms to out/demo/
#   make notebooks  re-executes every notebook at this machine's default scale and stores outputs
#   make bench      side-by-side benchmarks (musicgen-lite bench all)

VENV ?= .venv
PY := $(VENV)/bin/python
NBVAL_FLAGS := --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600

.PHONY: setup lab test unit test-notebooks demo notebooks bench clean

setup:
	@bash .ci/setup.sh

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# the unit tests run in 2 processes of one torch thread each (a file stays in one process); the
# notebooks one at a time, each kernel with the machine's threads (two at once would oversubscribe)
TEST_WORKERS ?= 2

test: setup
	CI=$${CI:-1} MUSICGEN_LITE_SCALE=tiny $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests
	CI=$${CI:-1} MUSICGEN_LITE_SCALE=tiny $(PY) -m pytest notebooks $(NBVAL_FLAGS)

unit: setup
	MUSICGEN_LITE_SCALE=tiny $(PY) -m pytest tests

test-notebooks: setup
	CI=$${CI:-1} MUSICGEN_LITE_SCALE=tiny $(PY) -m pytest notebooks $(NBVAL_FLAGS)

demo: setup
	$(VENV)/bin/musicgen-lite demo --out out/demo

notebooks: setup
	$(PY) .ci/run_notebooks.py notebooks

bench: setup
	$(VENV)/bin/musicgen-lite bench all

clean:
	rm -rf out .pytest_cache .hypothesis
