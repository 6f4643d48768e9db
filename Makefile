# make demo: set up .venv and train + sample SiD2 on the embedded digits (CPU, < 10 minutes).
# make test: set up .venv and run the CPU test suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/sid2_digits
PYTEST_ARGS ?=

.PHONY: demo test test-all venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || { base=$$(bash launch/find_python.sh) && echo "creating $(VENV) with $$base" && "$$base" -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'xmanager==0.8.5'  # local executor only: see setup.cfg [test]
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/main.py --config=configs/sid2_digits.py --workdir=$(DEMO_DIR) --mode=train
	$(PY) launch/main.py --config=configs/sid2_digits.py --workdir=$(DEMO_DIR) --mode=sample
	$(PY) benchmarks/digits_sample_quality.py --workdir=$(DEMO_DIR)
	@echo "samples: $(DEMO_DIR)/samples/ (grid: samples.png, arrays: samples.npz)"

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not accelerator" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not accelerator" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
