# The two commands of the README's quick start. Each one creates or updates .venv/ first
# (scripts/setup_env.sh; a no-op when nothing changed).
.PHONY: demo test gpu-check gpu-check-dry

DEMO_OUT ?= data/demo
GPU_CHECK_OUT ?= data/gpu-check
GPU_CHECK_PYTHON ?= .venv/bin/python

demo:
	@scripts/setup_env.sh
	.venv/bin/fvlm demo $(DEMO_OUT)

test:
	@scripts/setup_env.sh
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# The GPU readiness check of the base recipe (benchmarks/gpu_check.py, at most about 8 minutes on one GPU) and its
# CPU dry run (tiny model, under a minute). GPU_CHECK_PYTHON: an interpreter with fvlm's dependencies and a CUDA torch.
gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_OUT)

gpu-check-dry:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_OUT)-dry --cpu-dry-run
