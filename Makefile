# Two entry points: `make demo` (train + zero-shot on Fashion-MNIST) and `make test`.
# Each creates .venv on first use and installs requirements.txt into it; the
# stamp file makes a second run skip pip when the pins have not changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

WORKDIR ?= workdirs/demo
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test test-quick lint venv fashion-mnist

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# pip byte-compiles what it installs one file at a time (half of the install's 70 s on 2 cores);
# compileall does the same on every core afterwards. A file that does not compile is left to
# Python, which compiles it on import.
$(STAMP): requirements.txt requirements-nodeps.txt | $(PY)
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-nodeps.txt
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || echo "some installed files did not byte-compile"
	touch $(STAMP)

# Tests run in TEST_WORKERS processes (pytest-xdist), by default one more than the CPU cores, at
# most TEST_MAX_WORKERS (each worker holds its own JAX and TensorFlow). Compilation is mostly
# single-threaded, and the multi-process and subprocess tests spend much of their time waiting on
# sockets and child processes: the extra worker keeps the cores busy meanwhile (on 2 cores the
# suite took 18 min with 2 workers, 14.7 with 3). --dist load hands each worker a block of
# consecutive tests first (tests/conftest.py puts the long end-to-end ones at the front, so one
# worker runs them in turn while the others run short tests), then tests one by one. Handing out
# the long ones to all workers at once was slower (17 min): several multi-process jobs at a time
# oversubscribe the cores.
TEST_MAX_WORKERS ?= 4
TEST_WORKERS ?= $(shell n=$$(( $$(nproc) + 1 )); echo $$(( n < $(TEST_MAX_WORKERS) ? n : $(TEST_MAX_WORKERS) )))
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist load

test: $(STAMP)
	$(PYTEST) tests

# Everything but the tests marked slow (end-to-end trainings and multi-process jobs), for iterating.
test-quick: $(STAMP)
	$(PYTEST) -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The demo's data: Debian's dataset-fashion-mnist package (IDX files under /usr/share/datasets).
fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; \
	else echo "Fashion-MNIST is missing and installing it needs root. Run:"; \
	  echo "  sudo apt-get install dataset-fashion-mnist"; \
	  echo "or put the four IDX .gz files (train-images-idx3-ubyte.gz, ...) in a folder and run"; \
	  echo "  make demo FASHION_MNIST_DIR=/that/folder"; exit 1; fi; \
	$$SUDO apt-get install -y -q dataset-fashion-mnist || \
	  { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

demo: $(STAMP) fashion-mnist
	$(PY) -m scripts.demo --workdir $(WORKDIR) --config configs/demo.py:data_dir=$(FASHION_MNIST_DIR)
