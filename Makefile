# The two commands of the README: `make lab` opens the notebooks, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On CPU-only machines this pin is the CPU build; any other spec may pull gigabytes of CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: lab test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[notebooks,test]"
	touch $(STAMP)

install: $(STAMP)

# Jupyter refuses to run as root unless told to (containers often are root).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP)
	HESSKIT_FAST=1 $(BIN)/python -m pytest tests $(wildcard notebooks/*.ipynb) --nbmake --nbmake-timeout=600

bench: $(STAMP)
	$(BIN)/python bench/curvature.py
	$(BIN)/python bench/optimizers.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/hf_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
