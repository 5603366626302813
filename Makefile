# The two commands of the README:
#   make train   trains + evaluates Faster R-CNN R50-FPN on the built-in synthetic shapes (no download)
#   make test    runs the test suite
# Both create .venv on first use and install the project into it (editable, with the `resnet-det` command).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision are installed first so that a machine with local wheels (or a CUDA index set in
# pip's config) picks its own build; any torch >= 2.4 works.
TORCH  ?= torch torchvision
# A shipped config's name (`resnet-det configs` lists them) or a YAML file.
CONFIG ?= $(if $(DATA),coco/faster_rcnn_R_50_FPN_1x,shapes/faster_rcnn_R_50_FPN)
ARGS   ?=

.PHONY: install train test lint clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/resnet-det train $(CONFIG) $(if $(DATA),data.root=$(DATA)) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) output
