# Quick start: `make demo`, then `make test`. Everything installs into .venv with pip (DESIGN.md: not uv/poetry,
# which would download torch again instead of taking it from the local disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/itfits fit data/fashion --out runs/demo --epochs 3 --size 64
	$(BIN)/itfits predict runs/demo/model data/fashion_test data/fashion_unknown --out runs/demo/predictions.csv
	@echo "Results: runs/demo (run.json, history.csv, lr_find.png, confusion_matrix.png, model/, predictions.csv)"
	$(BIN)/itfits fit data/audio --out runs/demo_audio --epochs 4 --size 96 --duration 1 --lr 3e-3 --unknown data/audio_unknown
	$(BIN)/itfits predict runs/demo_audio/model data/audio_unknown data/audio/kick --out runs/demo_audio/predictions.csv
	@echo "Audio results: runs/demo_audio (the same files; clips rendered to mel spectrograms, cached in ~/.cache/itfits/mel)"

test: install
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf runs .pytest_cache
