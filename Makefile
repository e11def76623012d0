# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (what CI runs).
# Everything else here is what those two need. Torch is installed first, as the CPU build, so that the package's
# torch requirement pulls nothing more. The torch versions the package declares (pyproject.toml) are the ones `make
# test` tests: the newest it allows in .venv, the oldest in .venv-torch-oldest (`test-oldest-torch`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := flock /tmp/streamkern-build.lock

.PHONY: demo bench test test-oldest-torch test-fastvideo ext cuda-check clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.11,<=2.13.0" || $(PY) -m pip install -q "torch>=2.11,<2.14"
	$(PY) -m pip install -q "triton>=3.6" "pytest>=7" "hypothesis>=6.100" "numpy>=1.24" "scipy>=1.10" "matplotlib>=3.6" "tqdm>=4" "pytest-benchmark>=4" ninja setuptools wheel
	STREAMKERN_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental rebuild of streamkern._C in place (ninja recompiles only changed sources).
ext: $(VENV)/.ready
	$(LOCK) $(PY) setup.py -q build_ext --inplace

# Torch-free compile of the CUDA kernels for sm_89 and sm_90 (nvcc, no GPU needed), then a compile check of their
# torch bindings against torch's headers; skipped without nvcc.
NVCC := $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
cuda-check: $(VENV)/.ready
	@if [ -n "$(NVCC)" ]; then \
	  $(LOCK) sh -c 'cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER=$(NVCC) >/dev/null && cmake --build build/cmake -j 2' && \
	  tools/binding_check.sh $(PY) $(NVCC); \
	else echo "cuda-check: nvcc not found, CUDA compile check skipped"; fi

test: ext cuda-check
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-oldest-torch

# The quick tier (`pytest -m quick`: the imports, each public op's parity once per CPU backend and dtype) against the
# oldest torch the package declares, in a venv of its own: torch 2.11 (the registry's build, with its CUDA wheels)
# and the triton it pins, 3.6, whose interpreter needs numpy < 2.4 (it converts 1-element arrays with int()). The
# extension is built against that torch, CPU kernels only, in a copy of the tree (build/oldest-src: the same Python
# names the .so as the one `ext` builds in place), and the tests run from the copy, so they import the copy.
OVENV := .venv-torch-oldest
OPY   := $(abspath $(OVENV))/bin/python
OSRC  := build/oldest-src
$(OVENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(OVENV)
	$(OPY) -m pip install -q --upgrade pip
	$(OPY) -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=1.24,<2.4" "pytest>=7" "hypothesis>=6.100" "scipy>=1.10" ninja setuptools wheel
	touch $@

test-oldest-torch: $(OVENV)/.ready
	mkdir -p $(OSRC) && find $(OSRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C $(OSRC)
	STREAMKERN_NO_EXT=1 $(OPY) -m pip install -q --no-build-isolation --no-deps -e $(OSRC)
	cd $(OSRC) && STREAMKERN_NO_CUDA=1 $(LOCK) $(OPY) setup.py -q build_ext --inplace
	cd $(OSRC) && $(OPY) -m pytest -q -p no:cacheprovider -m quick \
	  -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" tests

# FastVideo's client tests (tests/integrations) in a venv of their own: torch first (the CPU build), then the pinned
# pure-Python packages, then fastvideo and torchvision without their CUDA-pinned dependencies, then streamkern
# (its extension is the one `ext` builds in place, against the same torch).
FVENV := .venv-fastvideo
FVPY  := $(FVENV)/bin/python
$(FVENV)/.ready: requirements-fastvideo.txt
	$(PYTHON) -m venv $(FVENV)
	$(FVPY) -m pip install -q torch==2.13.0
	$(FVPY) -m pip install -q -r requirements-fastvideo.txt
	$(FVPY) -m pip install -q --no-deps fastvideo==0.2.1 torchvision==0.28.0
	STREAMKERN_NO_EXT=1 $(FVPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-fastvideo: ext $(FVENV)/.ready
	FASTVIDEO_LOGGING_LEVEL=WARNING TQDM_DISABLE=1 $(FVPY) -m pytest -q tests/integrations

bench: ext
	$(PY) -m streamkern.bench

demo: ext
	$(PY) -m streamkern.demo

clean:
	rm -rf build $(VENV) $(FVENV) $(OVENV) streamkern/_C*.so *.egg-info
