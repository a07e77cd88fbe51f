# The two commands a newcomer needs:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU wheel of PyTorch; GPU users: install your CUDA torch into $(VENV) first and set TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/brainfusion: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/brainfusion

demo: install
	$(BIN)/brainfusion demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs data/demo
