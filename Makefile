# Every target installs what it needs into .venv on first use.
# torch is pinned so a CPU-only machine takes the CPU wheel instead of several GB of CUDA packages;
# constraints.txt holds every other package at the version the suite last passed with.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test fuzz demo bench-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# the property-based tests (hypothesis) with fresh random draws: CI's are fixed (tests/conftest.py)
fuzz: $(STAMP)
	LOWBIT_HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q -n auto -m hypothesis

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench-smoke: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python benchmarks/bench_gemm.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
