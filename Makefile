# kvq: `make demo` runs the main job on the built-in defaults, `make test` runs the tests.
# Both install what they need first. Torch is installed explicitly (CPU build 2.13.0 where none is
# present), because a plain `torch` requirement would pull several GB of CUDA packages.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATA_DIR ?= ../shared/data
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint clean

install: .installed

.installed: pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	@touch .installed

demo: install
	kvq eval-ppl --model smollm2-135m --dataset wikitext2 --data-dir $(DATA_DIR) --seqlen 2048 --max-windows 4

test: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

lint: install
	ruff check kvq_cli kernels tests bench

clean:
	rm -rf .installed build *.egg-info .pytest_cache
