# Two commands: `make run` (the demo pipeline: dvc repro) and `make test` (the whole suite).
# Each creates .venv when missing or stale (keyed on pyproject.toml) and installs the package with the dev and
# deploy (OpenVINO, NCNN, MNN) extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

export NO_ALBUMENTATIONS_UPDATE = 1
export DVC_NO_ANALYTICS = 1
export RAY_USAGE_STATS_ENABLED = 0
export PYTHONUNBUFFERED = 1

.PHONY: run test test-demo lint bench gpu-check clean-venv

$(STAMP): pyproject.toml
	@if [ -d $(VENV) ] && [ ! -x $(PY) ]; then rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,deploy]'
	touch $(STAMP)

run: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pipeline.run_demo

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q $(PYTEST_ARGS)

# the full demo training checked against its AP50 goal (left out of `make test`: 10-35 min by CPU)
test-demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m demo tests/pipeline/test_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests

bench: $(STAMP)
	$(PY) -m pipeline.bench infer

# NCCL, AMP bf16/fp16 steps, SyncBatchNorm, validation, ONNX parity: one JSON (exit 3: no CUDA device;
# every GPU of this machine through torchrun when it has several; GPU_CHECK_ARGS="--device cpu": the CPU dry run)
gpu-check: $(STAMP)
	@n=$$($(PY) -c 'import torch; print(torch.cuda.device_count())'); \
	if [ "$$n" -gt 1 ]; then $(PY) -m torch.distributed.run --standalone --nproc-per-node=$$n -m pipeline.tools.gpu_check $(GPU_CHECK_ARGS); \
	else $(PY) -m pipeline.tools.gpu_check $(GPU_CHECK_ARGS); fi

clean-venv:
	rm -rf $(VENV)
