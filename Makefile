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

# pip byte-compiles what it installs one file at a time (half of the install's 70 s on 2 cores),
# so it installs without; the tests' target byte-compiles everything on every core afterwards.
# requirements.txt pins every package, so two pips install it side by side without resolving
# dependencies: TensorFlow's wheel alone takes as long to unpack as all the others (16 s for both
# instead of 27 s in one pip on 2 cores). `pip check` then confirms that nothing is missing, and
# a pip that resolves dependencies installs whatever is.
$(STAMP): requirements.txt requirements-nodeps.txt | $(PY)
	grep -i '^tensorflow==' requirements.txt > $(VENV)/requirements-large.txt
	grep -iv '^tensorflow==' requirements.txt > $(VENV)/requirements-rest.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -r $(VENV)/requirements-large.txt & \
	  $(PY) -m pip install --quiet --no-compile --no-deps -r $(VENV)/requirements-rest.txt; \
	  rest=$$?; wait $$!; large=$$?; test $$rest = 0 && test $$large = 0
	$(PY) -m pip check > /dev/null || $(PY) -m pip install --quiet --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The tests start dozens of Python processes, each importing TensorFlow and JAX: byte-compiled
# once (18 s on 2 cores), their imports take 4-5 s instead of 10-12 where Python may not write
# bytecode itself (PYTHONDONTWRITEBYTECODE). The demo is one process: compiling everything first
# would cost it more (18 s) than its own imports save (6 s). A file that does not compile is left
# to Python, which compiles it on import.
BYTECODE := $(VENV)/.bytecode-compiled
$(BYTECODE): $(STAMP)
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || echo "some installed files did not byte-compile"
	touch $(BYTECODE)

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

test: $(BYTECODE)
	$(PYTEST) tests

# Everything but the tests marked slow (end-to-end trainings and multi-process jobs), for iterating.
test-quick: $(BYTECODE)
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
