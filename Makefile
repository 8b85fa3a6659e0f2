# Quick start: `make demo`, then `make test`. Everything installs into .venv with pip (not uv/poetry,
# which would download torch again instead of taking it from the local disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# itfits and what it needs (all that make demo needs); then the extras the tests need (make test)
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install browser demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,ray,export]'  # ray, export: the tests of --engine ray and itfits export
	touch $(TEST_STAMP)

# Each `make demo` writes a new set of run folders (runs/demo-TIME/images, audio, tabular), so it runs any number of times.
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)

demo: install
	$(BIN)/itfits fit data/fashion --out $(DEMO)/images --epochs 3 --size 64
	$(BIN)/itfits predict $(DEMO)/images/model data/fashion_test data/fashion_unknown --out $(DEMO)/images/predictions.csv
	$(BIN)/itfits evaluate $(DEMO)/images/model data/fashion_test --unknown data/fashion_unknown --out $(DEMO)/images/evaluate
	@echo "Results in $(DEMO)/images: report.html (open it first), run.json, history.csv, lr_find.png, confusion_matrix.png, model/, predictions.csv, evaluate/"
	$(BIN)/itfits fit data/audio --out $(DEMO)/audio --epochs 4 --size 96 --duration 1 --lr 3e-3 --unknown data/audio_unknown
	$(BIN)/itfits predict $(DEMO)/audio/model data/audio_unknown data/audio/kick --out $(DEMO)/audio/predictions.csv
	@echo "Audio results: $(DEMO)/audio (the same files; clips rendered to mel spectrograms, cached in ~/.cache/itfits/mel)"
	$(BIN)/itfits fit data/penguins.csv --target species --ignore year --out $(DEMO)/tabular
	$(BIN)/itfits predict $(DEMO)/tabular/model data/penguins.csv --out $(DEMO)/tabular/predictions.parquet
	@echo "Tabular results: $(DEMO)/tabular (report.html, run.json, history.csv, lr_find.png, confusion_matrix.png, model/, predictions.parquet)"

# The browser test (tests/test_web.py) drives the system Chromium: Debian chromium + chromium-driver, installed
# here with apt-get when missing and we are root (browser downloads do not work on these machines). Never fails:
# without Chromium the test skips and says why.
browser:
	$(PYTHON) tests/browser.py

test: $(TEST_STAMP) browser
	$(BIN)/python -m pytest -q -ra

# Every benchmark with the command bench/BENCHMARKS.md gives for it (18 minutes on 2 cores); each prints its table.
bench: $(TEST_STAMP)  # ray_predict.py and export_speed.py need the ray and export extras
	$(BIN)/python -m pip install -q -e '.[bench]'
	OMP_NUM_THREADS=1 $(BIN)/python bench/unknown_scores.py --seeds 0,1
	OMP_NUM_THREADS=1 $(BIN)/python bench/audio_render.py
	$(BIN)/python bench/tabular_ingest.py --repeats 5
	$(BIN)/python bench/table_sets.py && OMP_NUM_THREADS=1 $(BIN)/python bench/table_suite.py --seeds 0,1,2,3,4
	$(BIN)/python bench/train_speed.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/ray_predict.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/export_speed.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/imbalance.py --seeds 0,1

clean:
	rm -rf runs .pytest_cache
