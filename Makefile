# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (what CI runs).
# Everything else here is what those two need. Torch is installed first, as the CPU build, so that the
# `torch>=2.4` requirement of the package pulls nothing more.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := flock /tmp/streamkern-build.lock

.PHONY: demo bench test test-fastvideo ext cuda-check clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.4,<=2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q "triton>=3.2" "pytest>=7" "hypothesis>=6.100" "numpy>=1.24" "scipy>=1.10" "matplotlib>=3.6" "tqdm>=4" "pytest-benchmark>=4" ninja setuptools wheel
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
	rm -rf build $(VENV) $(FVENV) streamkern/_C*.so *.egg-info
