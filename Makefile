# cimstat: `make demo` sets up and runs the main job on the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean validation-report

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
# every point but one bit-serial design with programming error (8 chips) whose MC has not run to the end
# yet (design-bitserial-2b needs ~9 GB; thermal0.5-lattice, 63 rows and 1-bit slices, took 47 min)
VALIDATION_PENDING ?= 'design-bitserial-2b'
VALIDATION_SUBSET ?= label not in [$(VALIDATION_PENDING)]
validation-report: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m sweeps.validate sweeps/validation.py $(VALIDATION_MC) --subset "$(VALIDATION_SUBSET)" --report docs/validation.md

clean:
	rm -rf $(VENV) build *.egg-info
