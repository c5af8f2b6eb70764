# The two commands of the README's quick start. Each one creates or updates .venv/ first
# (scripts/setup_env.sh; a no-op when nothing changed).
.PHONY: demo test

DEMO_OUT ?= data/demo

demo:
	@scripts/setup_env.sh
	.venv/bin/fvlm demo $(DEMO_OUT)

test:
	@scripts/setup_env.sh
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
