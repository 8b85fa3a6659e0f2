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
	$(BIN)/itfits fit data/penguins.csv --target species --ignore year --out runs/demo_tabular
	$(BIN)/itfits predict runs/demo_tabular/model data/penguins.csv --out runs/demo_tabular/predictions.parquet
	@echo "Tabular results: runs/demo_tabular (run.json, history.csv, lr_find.png, confusion_matrix.png, model/, predictions.parquet)"

test: install
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf runs .pytest_cache
