# Fresh-machine set-up lives here: `make demo` and `make test` create .venv and install what they need.
# Torch: an already-installed torch (system site-packages) is used as is; otherwise TORCH_SPEC is
# installed first (on CPU-only machines point pip at a CPU build, e.g. PIP_EXTRA_INDEX_URL=<cpu index>).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.videovae-installed

.PHONY: setup test demo demo-train lint clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m videovae.demo

demo-train: $(STAMP)
	$(PY) -m videovae.train.demo

# On a GPU machine (needs only torch, Triton, einops, safetensors, numpy, pytest; no install):
# kernel tests on CUDA, kernel benchmark, end-to-end od-vae table -> gpu_check/gpu_check.{md,json}
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out gpu_check

clean:
	rm -rf $(VENV) demo_out .pytest_cache
