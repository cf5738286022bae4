# kvq: `make demo` runs the main job on the built-in defaults, `make test` runs the tests.
# Both install what they need first. Torch is installed explicitly (CPU build 2.13.0 where none is
# present), because a plain `torch` requirement would pull several GB of CUDA packages.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATA_DIR ?= ../shared/data
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-oldest lint clean

install: .installed

.installed: pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	@touch .installed

DEMO_DIR ?= demo-artifacts

# The main job on the built-in default (real SmolLM2-135M, bundled WikiText-2): calibrate KVQuant 3-bit
# with 1% outliers (a short calibration, a few minutes on 2 CPU cores), compare it with KIVI and int
# baselines against the same-run fp16 perplexity, retrieve a passkey from a 2K-token haystack through the
# packed cache, then say what a 1M-token context would cost.
demo: install
	kvq calibrate --model smollm2-135m --dataset wikitext2-valid --data-dir $(DATA_DIR) --samples 4 \
		--seqlen 1024 --method kvquant --bits 3 --outliers 0.01 --out $(DEMO_DIR)/kvquant-3b-1pct.safetensors
	kvq eval-ppl --model smollm2-135m --dataset wikitext2 --data-dir $(DATA_DIR) --seqlen 2048 --max-windows 4 \
		--artifact $(DEMO_DIR)/kvquant-3b-1pct.safetensors --method kivi2 --method kivi4 --method int4
	kvq generate --model smollm2-135m --artifact $(DEMO_DIR)/kvquant-3b-1pct.safetensors --haystack \
		--context 2K --depth 0.9 --seed 1 --max-new-tokens 8 --data-dir $(DATA_DIR)
	kvq estimate-memory --model llama-3-8b --context 1M --gpu h100-80gb
	@echo "demo done: it wrote $(DEMO_DIR)/kvquant-3b-1pct.safetensors (the calibrated KVQuant artifact, for"
	@echo "--artifact in eval-ppl, generate and estimate-memory); the tables above were printed, not saved."

test: install
	@$(PYTHON) -c "import transformers, torch; print('transformers', transformers.__version__, '| torch', torch.__version__)"
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

# The oldest transformers kvq supports (the GPU machines' version), in a second environment that shares
# everything else: the tests that touch transformers' interfaces (cache, attention hooks, generate, the real model,
# config.json read as transformers reads it).
TRANSFORMERS_OLDEST ?= 5.17.0
OLDEST_ENV ?= .venv-transformers-oldest
OLDEST_TESTS ?= tests/test_runtime.py tests/test_generate.py tests/test_calibration.py tests/test_integration_smollm2.py \
	tests/test_startup.py
test-oldest: install
	@test -x $(OLDEST_ENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(OLDEST_ENV)
	$(OLDEST_ENV)/bin/python -m pip install -q "transformers==$(TRANSFORMERS_OLDEST)"
	TRITON_INTERPRET=1 $(OLDEST_ENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

lint: install
	ruff check kvq_cli kernels tests bench

clean:
	rm -rf .installed build *.egg-info .pytest_cache $(OLDEST_ENV)
