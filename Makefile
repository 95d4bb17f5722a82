# The two commands of the README: `make lab` opens the notebooks, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On CPU-only machines this pin is the CPU build; any other spec may pull gigabytes of CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: lab test claims install bench clean

# curvlinops (bench/curvature.py's comparison, tests/curvature/test_curvlinops.py) is installed on its own, with
# --no-deps and its four pure-Python dependencies pinned: its backpack-for-pytorch dependency pulls
# torchvision, which has no CPU build for torch 2.13, so it is not in pyproject.toml's dependencies.
# Its operators and estimators do not need backpack. The stamp depends on this Makefile so that a
# change here re-installs existing venvs.
CURVLINOPS_SPEC := curvlinops-for-pytorch==3.0.1 einconv==0.1.0 einops==0.8.2 linear_operator==0.6.1 opt-einsum==3.4.0

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[notebooks,test]"
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt --no-deps $(CURVLINOPS_SPEC)
	touch $(STAMP)

install: $(STAMP)

# Jupyter refuses to run as root unless told to (containers often are root).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

# `make lab` first sets up nbstripout as this clone's git filter for notebooks (.gitattributes names it):
# git stores and diffs every notebook without outputs, execution counts and the kernel's run-time
# metadata, so JupyterLab's autosave never puts outputs into a commit. Cell ids are kept (they are
# stable here). Should .venv be gone (make clean), the filter passes notebooks through unchanged
# instead of breaking git, and tests/test_data_models.py still fails on committed outputs. Outside
# a git clone nothing is configured; `make test` needs none of it.
NBSTRIPOUT_PY := $(abspath $(BIN))/python
NBSTRIPOUT_FN = f() { if [ -x "$(NBSTRIPOUT_PY)" ]; then "$(NBSTRIPOUT_PY)" -m nbstripout --keep-id $(1); else cat $(2); fi; }; f
NBSTRIPOUT_KEYS := $(addprefix metadata.language_info.,codemirror_mode file_extension mimetype nbconvert_exporter pygments_lexer version)

lab: $(STAMP)
	if [ "$$(git rev-parse --show-toplevel 2>/dev/null)" = "$(CURDIR)" ]; then \
	  $(BIN)/nbstripout --install --attributes .gitattributes && \
	  git config filter.nbstripout.clean '$(call NBSTRIPOUT_FN)' && \
	  git config filter.nbstripout.extrakeys '$(NBSTRIPOUT_KEYS)' && \
	  git config diff.ipynb.textconv '$(call NBSTRIPOUT_FN,-t "$$1","$$1")'; \
	fi
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP)
	HESSKIT_FAST=1 $(BIN)/python -m pytest tests $(wildcard notebooks/*.ipynb) --nbmake --nbmake-timeout=600

# Not part of `make test`: every notebook at its full budget (minutes each); a conclusion the text
# draws from a number is checked by `claim(...)`, and a failed claim fails the run. NOTEBOOKS=... for a subset.
NOTEBOOKS ?= $(wildcard notebooks/*.ipynb)
claims: $(STAMP)
	HESSKIT_CLAIMS=1 HESSKIT_FAST= $(BIN)/python -m pytest $(NOTEBOOKS) --nbmake --nbmake-timeout=900

bench: $(STAMP)
	$(BIN)/python bench/curvature.py
	$(BIN)/python bench/optimizers.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/hf_models.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
