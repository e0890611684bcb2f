# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv first (once).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: demo test lint format clean-venv

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[test]'
	$(PY) -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, \
	'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

demo: $(VENV)/.installed  ## a bundled clip through the whole path, in JAX and in HF torch
	$(VENV)/bin/granite-jax demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint  ## what CI runs
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
