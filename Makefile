# The two commands of the README:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Data root: IMCLASS_DATA when set, else ../shared/data when that folder exists (development convenience).
IMCLASS_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export IMCLASS_DATA

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import imclass, torch, torchvision, timm" && touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/imclass knn --dataset cifar10 --metric l1 --k 1

test: venv
	$(BIN)/python -m pytest -n 2 -q

bench: venv
	$(BIN)/pip install --quiet -e '.[bench]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python bench/knn.py

clean:
	rm -rf $(VENV) build *.egg-info
