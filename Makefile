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

.PHONY: demo serve test test-reliability test-sanitize test-python test-cpp cpp-build check-cuda aoti-package install torch bench bench-check bench-baseline bench-gpu clean help

help:
	@echo "make demo   - install and run the demo"
	@echo "make serve  - install and serve tiny-shapes over HTTP on a local Ray instance (fastdiff serve)"
	@echo "make test   - install test extras, run C++ (ctest) and Python (pytest) tests, and check-cuda"
	@echo "make test-reliability - the whole reliability suite (fuzzed files, faults, kill/resume, load), with its counts table"
	@echo "make test-sanitize - the C++ core, service and _C binding built with ASan+UBSan (build/sanitize): ctests, the binding's and the service's tests"
	@echo "make check-cuda - compile the CUDA runner example against CUDA 12.3/12.4/13 headers and for sm_80/sm_90 (no GPU)"
	@echo "make bench  - run the CPU benchmark suites, write JSON and the report"
	@echo "make bench-check - run the benchmark subset marked 'check' and compare it with this machine class's baseline"
	@echo "make bench-baseline - record this machine class's baseline (bench/baselines/<class>/) from 3 idle runs of the subset"
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
	$(PY) -m fastdiff.cli sample "$(DEMO_PROMPT)" --model tiny-shapes --steps 5 --seed 0 --scale 8 --out demo/tiny-shapes.png

# An HTTP service of tiny-shapes on a local Ray instance (Ctrl-C stops it).
serve: install
	$(PY) -m fastdiff.cli serve --model tiny-shapes

# The reliability suite (tests/reliability, also part of `make test`): fuzzed and corrupt files,
# numerical faults, kill/resume, concurrency; each module records its counts in build/reliability/,
# and tests/reliability/counts.py prints them as one table (the README's).
test-reliability: cpp-build
	rm -rf build/reliability
	FASTDIFF_RELIABILITY_OUT=build/reliability FASTDIFF_RELIABILITY_FULL=1 \
	  $(PY) -m pytest -q -m reliability tests/reliability
	@$(PY) -m tests.reliability.counts build/reliability

# The C++ tests. With torch importable (always after `install`) they include the libtorch parts:
# the AOTI engine and the service example, run on an AOTInductor package of tiny-shapes that is
# compiled here first (about 2 minutes on 2 cores; rebuilt when fastdiff/aoti.py changes).
AOTI_PACKAGE ?= build/aoti/tiny-shapes
TORCH_PREFIX = $(shell $(PY) -c "import torch.utils; print(torch.utils.cmake_prefix_path)" 2>/dev/null)

$(AOTI_PACKAGE)/package.json: python/fastdiff/aoti.py
	$(PY) -m fastdiff.cli export --format aoti --model tiny-shapes --out $(AOTI_PACKAGE) --steps 8 \
	  --prompt "a red circle on a blue background" --prompt "a green square at the top"

aoti-package: install $(AOTI_PACKAGE)/package.json

cpp-build: aoti-package
	cmake -S . -B $(BUILD_DIR) -DFASTDIFF_BUILD_TESTS=ON -DFASTDIFF_BUILD_PYTHON=OFF \
	  -DFASTDIFF_WITH_TORCH=ON -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	  -DFASTDIFF_TEST_PACKAGE="$(abspath $(AOTI_PACKAGE))" > /dev/null
	cmake --build $(BUILD_DIR) --parallel $(JOBS)

test-cpp: cpp-build
	cd $(BUILD_DIR) && ctest --output-on-failure

# The sanitizer run (csrc/tools/sanitize.sh; CI runs it after `make test`): everything C++ built
# with AddressSanitizer + UBSan (FASTDIFF_SANITIZE=ON) in build/sanitize, its _C module in
# build/sanitize/python (the installed python/fastdiff/_C is untouched); then the ctests (core and
# the service on the AOTI package), and pytest with the ASan runtime preloaded: the binding's tests
# (the fuzzed plan files, the cpp loop) on that _C and the service's (the corrupt AOTI packages) on
# the sanitized service. Any sanitizer report fails it. About 11.5 minutes on 2 cores.
SANITIZE_DIR ?= build/sanitize

test-sanitize: aoti-package
	PYTHON=$(PY) BUILD_DIR=$(SANITIZE_DIR) JOBS=$(JOBS) TORCH_PREFIX="$(TORCH_PREFIX)" \
	  AOTI_PACKAGE="$(abspath $(AOTI_PACKAGE))" csrc/tools/sanitize.sh

# The CUDA runner example compiled for every CUDA version it claims, without a GPU: its host side
# with g++ -Werror against the CUDA 13 headers and the CUDA 12.3/12.4 runtime headers from PyPI
# (downloaded once into build/cuda-check), and its kernels with nvcc for sm_80/sm_90.
check-cuda: $(VENV)/.created
	PYTHON=$(PY) csrc/tools/check_cuda_headers.sh

# pytest exits with 5 when it collects no tests; that is not a failure here.
test-python:
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test: install check-cuda test-cpp test-python bench-check

# bench/test_service_cpu.py times the C++ service binary on the AOTI package: cpp-build makes both.
bench: install cpp-build
	mkdir -p bench/out
	$(PY) -m pytest bench -q --ignore=bench/gpu --benchmark-json=bench/out/cpu.json; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
	$(PY) bench/report.py bench/out/cpu.json --out bench/results

# Benchmark regressions (bench/check.py): the subset marked `check` against the baseline committed for
# this machine class, bench/baselines/<class>/. Raw time: pytest-benchmark's own compare (time.json)
# shows every benchmark against the baseline and fails one whose fastest round (min) is more than
# BENCH_TIME_FAIL slower (4x: raw time on a shared machine moves 2x by itself). The quantities that a
# slower or busy machine does not move (time relative to a yardstick measured side by side, which
# fails at +60%, i.e. a 2x slowdown; speed-ups side by side; UNet calls; quality errors):
# bench/check.py with per-quantity tolerances. No baseline for this class: the message says
# how to record one (`make bench-baseline`, then commit it). BENCH_SLOWDOWN=2 slows the sampling loop
# down 2x on purpose, to see the check fail (bench/conftest.py).
BENCH_TIME_FAIL ?= min:300%
BENCH_SUBSET = -m pytest bench -q -m check --ignore=bench/gpu -p no:cacheprovider
BENCH_BASELINE_RUNS ?= 3
# pytest-benchmark warns with both machines' whole machine_info when any field differs (the host
# name always does between CI runners); the machine class chose the baseline, and check.py says
# when the CPUs differ.
BENCH_SAME_CLASS = -W "ignore:Benchmark machine_info is different"

bench-check: install
	@mkdir -p bench/out
	@baseline=$$($(PY) bench/check.py timing-baseline) || exit 2; \
	compare="--benchmark-json=bench/out/check.json --benchmark-compare=$$baseline --benchmark-compare-fail=$(BENCH_TIME_FAIL)"; \
	echo "$(PY) $(BENCH_SUBSET) $$compare"; \
	$(PY) $(BENCH_SAME_CLASS) $(BENCH_SUBSET) $$compare; timing=$$?; \
	$(PY) bench/check.py compare bench/out/check.json; quantities=$$?; \
	if [ $$timing -ne 0 ]; then echo "bench-check: the benchmarks failed or their time regressed (pytest exit $$timing, above)" >&2; fi; \
	[ $$timing -eq 0 ] && [ $$quantities -eq 0 ]

# The baseline: BENCH_BASELINE_RUNS runs of the subset on the idle machine, each benchmark from the
# run where it was fastest (bench/check.py record).
bench-baseline: install
	@mkdir -p bench/out
	rm -f bench/out/baseline-*.json
	@for i in $$(seq 1 $(BENCH_BASELINE_RUNS)); do \
	  echo "bench-baseline: run $$i of $(BENCH_BASELINE_RUNS)"; \
	  $(PY) $(BENCH_SUBSET) --benchmark-json=bench/out/baseline-$$i.json || exit 1; \
	done
	$(PY) bench/check.py record bench/out/baseline-*.json

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
