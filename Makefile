# fastdiff: two commands on a fresh machine.
#   make demo   installs, then samples an image with the embedded tiny-shapes model
#   make test   installs the test extras, then runs the C++ and Python test suites
# Everything goes into a virtual environment (.venv) that can see the system's packages, so an
# already installed torch (e.g. a CUDA build) is kept; without one, torch==2.13.0 is installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUILD_DIR ?= build/cmake
JOBS ?= 2

.PHONY: demo test test-python test-cpp check-cuda aoti-package install torch bench bench-gpu clean help

help:
	@echo "make demo   - install and run the demo"
	@echo "make test   - install test extras, run C++ (ctest) and Python (pytest) tests, and check-cuda"
	@echo "make check-cuda - compile the CUDA runner example against CUDA 12.3/12.4/13 headers and for sm_80/sm_90 (no GPU)"
	@echo "make bench  - run the CPU benchmark suites, write JSON and the report"
	@echo "make bench-gpu - run the GPU benchmark suite (needs CUDA), write JSON and bench/results/gpu_summary.json"
	@echo "make clean  - remove build outputs and the virtual environment"

$(VENV)/.created:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@touch $@

torch: $(VENV)/.created
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(PIP) install torch==2.13.0; \
	fi

install: torch
	$(PIP) install --quiet "setuptools>=64" wheel "pybind11>=2.11"
	$(PIP) install --no-build-isolation -e ".[test]"
	@# only the CLIP BPE vocabulary file is used (sd21's tokenizer); its torchvision dependency is not
	$(PIP) install --quiet --no-deps open_clip_torch

DEMO_PROMPT ?= a red circle on a blue background

demo: install
	$(PY) -m fastdiff.cli sample "$(DEMO_PROMPT)" --model tiny-shapes --steps 20 --seed 0 --scale 8 --out demo/tiny-shapes.png

# The C++ tests. With torch importable (always after `install`) they include the libtorch parts:
# the AOTI engine and the service example, run on an AOTInductor package of tiny-shapes that is
# compiled here first (about 2 minutes on 2 cores; rebuilt when fastdiff/aoti.py changes).
AOTI_PACKAGE ?= build/aoti/tiny-shapes
TORCH_PREFIX = $(shell $(PY) -c "import torch.utils; print(torch.utils.cmake_prefix_path)" 2>/dev/null)

$(AOTI_PACKAGE)/package.json: python/fastdiff/aoti.py
	$(PY) -m fastdiff.cli export --format aoti --model tiny-shapes --out $(AOTI_PACKAGE) --steps 8 \
	  --prompt "a red circle on a blue background" --prompt "a green square at the top"

aoti-package: install $(AOTI_PACKAGE)/package.json

test-cpp: aoti-package
	cmake -S . -B $(BUILD_DIR) -DFASTDIFF_BUILD_TESTS=ON -DFASTDIFF_BUILD_PYTHON=OFF \
	  -DFASTDIFF_WITH_TORCH=ON -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	  -DFASTDIFF_TEST_PACKAGE="$(abspath $(AOTI_PACKAGE))" > /dev/null
	cmake --build $(BUILD_DIR) --parallel $(JOBS)
	cd $(BUILD_DIR) && ctest --output-on-failure

# The CUDA runner example compiled for every CUDA version it claims, without a GPU: its host side
# with g++ -Werror against the CUDA 13 headers and the CUDA 12.3/12.4 runtime headers from PyPI
# (downloaded once into build/cuda-check), and its kernels with nvcc for sm_80/sm_90.
check-cuda: $(VENV)/.created
	PYTHON=$(PY) csrc/tools/check_cuda_headers.sh

# pytest exits with 5 when it collects no tests; that is not a failure here.
test-python:
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test: install check-cuda test-cpp test-python

bench: install
	mkdir -p bench/out
	$(PY) -m pytest bench -q --ignore=bench/gpu --benchmark-json=bench/out/cpu.json; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
	$(PY) bench/report.py bench/out/cpu.json --out bench/results

# GPU suite (bench/gpu): skipped without CUDA, and then the summary says no results came. Extra pytest
# arguments go in BENCH_GPU_ARGS, e.g. BENCH_GPU_ARGS='-k "not compiled"' (compiling takes minutes per shape).
# Telemetry needs nvidia-ml-py; without it (no network) the JSON says telemetry is unavailable.
BENCH_GPU_ARGS ?=

bench-gpu: install
	@$(PY) -c "import pynvml" 2>/dev/null || $(PIP) install --quiet nvidia-ml-py || \
	  echo "bench-gpu: could not install nvidia-ml-py; the results will say telemetry is unavailable"
	mkdir -p bench/out
	$(PY) -m pytest bench/gpu -q -rs --benchmark-json=bench/out/gpu.json $(BENCH_GPU_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
	$(PY) bench/gpu_summary.py bench/out/gpu.json --out bench/results

clean:
	rm -rf build demo $(VENV) python/fastdiff/*.so python/fastdiff/_build_info.py *.egg-info python/*.egg-info
