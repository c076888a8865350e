# cimstat: `make demo` sets up and runs the main job on the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: validation-report-precise setup demo test bench clean validation-report validation-mc-jobs

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m cimstat.demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/mc_speed.py
	$(PY) benchmarks/probe_speed.py
	$(PY) benchmarks/estimate_speed.py

# docs/validation.md: estimate vs Monte Carlo on sweeps/validation.py (MC results cached in results/.mc-cache;
# the committed entries make the report a few minutes of estimates)
VALIDATION_MC ?= --n-images 1000 --instances 2 --programmed-instances 16 --batch-size 500
# Uncached, the Monte Carlo of every point is hours of CPU (design-bitserial-2b took 52 min at 256 images and
# 8 chips on 2 threads; this set is 1,000 images and 16 chips).
# VALIDATION_DEVICE=cuda runs it on a local GPU; on another machine: `make validation-mc-jobs`, then there
# `python -m sweeps.mc_jobs results/validation-jobs.pt --device cuda --runners 4 --out results.jsonl` (the committed entries:
# 4 runners side by side on one H200, 258 s for all 39), then here `make validation-report VALIDATION_IMPORT=results.jsonl`.
# VALIDATION_SUBSET="label in ['int8', 'w4']" selects a part
VALIDATION_SUBSET ?=
VALIDATION_DEVICE ?= cpu
VALIDATION_IMPORT ?=
VALIDATION_ARGS = $(VALIDATION_MC) $(if $(VALIDATION_SUBSET),--subset "$(VALIDATION_SUBSET)") $(if $(filter-out cpu,$(VALIDATION_DEVICE)),--device $(VALIDATION_DEVICE)) $(if $(VALIDATION_IMPORT),--import-mc-results $(VALIDATION_IMPORT))
validation-report: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_ARGS) --report docs/validation.md

validation-mc-jobs: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_MC) $(if $(VALIDATION_SUBSET),--subset "$(VALIDATION_SUBSET)") --export-mc-jobs results/validation-jobs.pt

# the same with the engine's precise ADC route (--adc-per-image; 5-14 s per estimate): docs/validation-precise.md
validation-report-precise: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_ARGS) --adc-per-image --report docs/validation-precise.md

clean:
	rm -rf $(VENV) build *.egg-info
