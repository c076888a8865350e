# cimstat: `make demo` sets up and runs the main job on the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: validation-report-precise setup demo test bench clean validation-report

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

# docs/validation.md: estimate vs Monte Carlo on sweeps/validation.py (MC results cached in results/.mc-cache)
VALIDATION_MC ?= --n-images 256 --instances 2 --programmed-instances 8 --batch-size 64
# every point of the sweep (MC per configuration, uncached, 2 threads: 7 s to 52 min; design-bitserial-2b was seen
# at 5.5 GB RSS and was OOM-killed at 9.3 GB beside the tests);
# VALIDATION_SUBSET="label in ['int8', 'w4']" selects a part
VALIDATION_SUBSET ?=
validation-report: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_MC) $(if $(VALIDATION_SUBSET),--subset "$(VALIDATION_SUBSET)") --report docs/validation.md

# the same with the engine's precise ADC route (--adc-per-image; 5-14 s per estimate): docs/validation-precise.md
validation-report-precise: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_MC) --adc-per-image $(if $(VALIDATION_SUBSET),--subset "$(VALIDATION_SUBSET)") --report docs/validation-precise.md

clean:
	rm -rf $(VENV) build *.egg-info
