# gompertz_kd developer commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint format train notebooks bench gpu-wheels gpu-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python ## create .venv and install gompertz_kd with its dev tools (editable)
	$(BIN)/pip install -e '.[dev]'

test: ## run the default test suite (excludes tests marked slow)
	$(BIN)/pytest

test-full: ## run every test, slow ones included
	$(BIN)/pytest -m ''

lint: ## check style with ruff
	$(BIN)/ruff check src tests scripts notebooks
	$(BIN)/ruff format --check src tests scripts notebooks

format: ## rewrite files in ruff's style
	$(BIN)/ruff check --fix src tests scripts notebooks
	$(BIN)/ruff format src tests scripts notebooks

train: ## train one experiment: make train ARGS="experiment=c100_resnet50_mbv2"
	$(BIN)/python -m gompertz_kd.run $(ARGS)

notebooks: ## run the notebooks; executed copies with plots in logs/notebooks/ (ARGS=--tiny: seconds, generated data)
	$(BIN)/python scripts/run_notebooks.py $(ARGS)

bench: ## time the distillation steps, every method's step, data paths and torch.compile (budget 7 min on a 2-CPU machine); writes docs/benchmarks.md
	$(BIN)/python -m gompertz_kd.bench --batch 32 --repeats 5 --budget 420 --compile --output docs/benchmarks.md

# What scripts/gpu_check.sh needs on a GPU machine whose Python lacks it (a stock CUDA image with
# torch, lightning, timm and torchmetrics), as wheels for that Python: copy .whl/ with the checkout.
GPU_WHEELS  := hydra-core==1.3.2 omegaconf==2.3.0 POT==0.9.7.post1
PY_VERSION  ?= 3.12
PLATFORMS   := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: ## download into .whl/ the wheels scripts/gpu_check.sh installs where they are missing (PY_VERSION=3.12)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(PY_VERSION) \
		--implementation cp $(PLATFORMS) -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3  # no wheel on PyPI; pure Python

gpu-check: ## the GPU check (scripts/gpu_check.sh; ARGS=--dry-run runs it on the CPU with tiny networks)
	scripts/gpu_check.sh $(ARGS)

clean: ## remove caches and build outputs (keeps .venv and data)
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
