# The two commands of the README:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Data root: IMCLASS_DATA when set, else ../shared/data when that folder exists (development convenience).
IMCLASS_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export IMCLASS_DATA
# Weights root (pretrained backbones): IMCLASS_WEIGHTS when set, else ../shared/weights when that folder exists.
IMCLASS_WEIGHTS ?= $(if $(wildcard ../shared/weights),$(abspath ../shared/weights),)
export IMCLASS_WEIGHTS

.PHONY: demo test venv browser bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import imclass, torch, torchvision, timm" && touch $@

venv: $(VENV)/.installed

# The main job: the fast recipe trains on all 50,000 CIFAR-10 training images and prints test accuracy.
demo: venv
	$(BIN)/imclass train cifar10 --recipe fast --target 90 --out runs/demo

# The page tests drive Debian's chromium headless: installed here when missing (needs root and apt); fails
# loudly when it cannot (the browser tests are part of `make test`, never skipped there).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$IMCLASS_CHROMIUM" ] || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || { \
	  echo "make browser: could not install chromium (needs root and apt-get): install it (apt-get install chromium)" \
	       "or set IMCLASS_CHROMIUM to a Chromium binary, then run make test again" >&2; exit 1; }

# IMCLASS_TEST_STRICT=1: a missing input (weights, photos, chromium, playwright, faiss, pyarrow, a k-NN kernel
# the CPU should run) stops the run at once with what to install; only a GPU test may skip (tests/conftest.py).
test: venv browser
	IMCLASS_TEST_STRICT=1 $(BIN)/python -m pytest -n 2 -q

# Every benchmark, each against its peer (long: about an hour on 2 CPU cores). See bench/RESULTS.md.
bench: venv
	$(BIN)/pip install --quiet -e '.[bench]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python bench/knn.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/keras_cnn.py
	$(BIN)/python bench/fast.py --target 90 --seeds 0 1 2

clean:
	rm -rf $(VENV) build *.egg-info
