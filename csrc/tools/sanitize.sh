#!/usr/bin/env bash
# `make test-sanitize`: the C++ core, the libtorch parts, the service example and the _C binding
# built with AddressSanitizer + UndefinedBehaviorSanitizer (CMake's FASTDIFF_SANITIZE=ON) in
# $BUILD_DIR, then
#   1. their ctests (the core tests, and the service on the AOTI package $AOTI_PACKAGE), and
#   2. pytest under ASan: the binding's tests (the fuzzed plan files, the plan files, the cpp loop,
#      the gate) with the sanitized _C imported as fastdiff._C (csrc/tools/sanitize_plugin.py),
#      and the service's tests (the corrupt AOTI packages, service vs Python engine) on the
#      sanitized fastdiff_service.
# Any ASan or UBSan report fails the run: ASan stops at its first error and UBSan at its first
# finding (-fno-sanitize-recover=undefined, halt_on_error=1); a ctest fails on a report in its
# output even where a pass regex judges it (CMakeLists.txt); in step 2 ASan writes its reports to
# $BUILD_DIR/sanitizer-reports/ and UBSan exits with status 86, so a report from a service
# process that a test runs and expects to fail (with status 1, its stderr captured) fails the run.
#
# Environment (the Makefile sets them): PYTHON (the venv's python), BUILD_DIR (build/sanitize),
# JOBS, TORCH_PREFIX (torch.utils.cmake_prefix_path), AOTI_PACKAGE (absolute path of a package
# made by `fastdiff export --format aoti`), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
case $PYTHON in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # for CMake
BUILD_DIR=${BUILD_DIR:-build/sanitize}
JOBS=${JOBS:-2}
: "${TORCH_PREFIX:?set TORCH_PREFIX to torch.utils.cmake_prefix_path}"
: "${AOTI_PACKAGE:?set AOTI_PACKAGE to an AOTI package directory (make aoti-package)}"
BUILD_ABS="$(pwd)/$BUILD_DIR"
MODULE_DIR="$BUILD_ABS/python"
REPORTS="$BUILD_ABS/sanitizer-reports"

LIBASAN=$(${CXX:-g++} -print-file-name=libasan.so)
LIBSTDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ]; then
    echo "sanitize: the compiler has no libasan.so ($LIBASAN); install libasan (GCC) to run the binding's tests" >&2
    exit 2
fi

# RelWithDebInfo: -O2 -g, so reports have file:line, and pybind11 does not strip the module.
# No CUDA runner example: nvcc takes no -fsanitize (its host code is the core's, tested here).
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTDIFF_SANITIZE=ON \
    -DFASTDIFF_WITH_CUDA=OFF -DFASTDIFF_BUILD_TESTS=ON \
    -DFASTDIFF_WITH_TORCH=ON -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DFASTDIFF_TEST_PACKAGE="$AOTI_PACKAGE" \
    -DFASTDIFF_BUILD_PYTHON=ON -DFASTDIFF_PYTHON_MODULE_DIR="$MODULE_DIR" \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    -Dpybind11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
# (not a sub-make of `make test-sanitize`: no "Entering directory" lines)
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL cmake --build "$BUILD_DIR" --parallel "$JOBS"

export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The ctests are programs of ours (the service also links libtorch): leak checking stays on.
echo "sanitize: ctest in $BUILD_DIR"
(cd "$BUILD_DIR" && ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:check_initialization_order=1 \
    ctest --output-on-failure)

# pytest. The instrumented _C needs the ASan runtime loaded before anything else (LD_PRELOAD;
# Python itself is not instrumented), and libstdc++ with it: python does not link libstdc++, and
# ASan resolves its __cxa_throw interceptor when it starts, so without libstdc++ already loaded
# the first C++ exception thrown in _C aborts with "CHECK failed: asan_interceptors.cpp ...
# real___cxa_throw != 0" (google/sanitizers issue 934, GCC PR 84428).
# detect_leaks=0: CPython, torch and NumPy keep allocations alive until exit by design (interned
# objects, module state, caches), so leak reports at exit would be theirs, not ours; every other
# ASan check stays on, for our code and theirs (libtorch is not instrumented, but its heap calls
# are checked: no suppression has been needed). log_path: ASan's reports go to $REPORTS, checked
# below (UBSan's aborting handlers ignore log_path and print to stderr: exitcode=86 instead).
# --capture=sys: pytest's fd capture would hide anything printed just before an abort.
# Left out: tests/reliability/test_service_load.py (800 requests; its flat-memory check reads RSS,
# which ASan's quarantine and shadow memory grow by design); the service ctest runs 8 threads here.
echo "sanitize: pytest with $MODULE_DIR/_C and $BUILD_DIR/fastdiff_service under ASan+UBSan"
rm -rf "$REPORTS" "$BUILD_ABS/reliability" && mkdir -p "$REPORTS"
status=0
LD_PRELOAD="$LIBASAN $LIBSTDCXX" ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan" \
    UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86" \
    FASTDIFF_SANITIZED_C="$MODULE_DIR" PYTHONPATH="csrc/tools${PYTHONPATH:+:$PYTHONPATH}" \
    FASTDIFF_SERVICE="$BUILD_ABS/fastdiff_service" FASTDIFF_AOTI_PACKAGE="$AOTI_PACKAGE" \
    FASTDIFF_RELIABILITY_OUT="$BUILD_ABS/reliability" \
    "$PYTHON" -m pytest -q --capture=sys -p no:cacheprovider -p sanitize_plugin \
    tests/reliability/test_plan_fuzz.py tests/test_cpp_runtime.py tests/test_plan_files.py \
    tests/test_gate.py tests/test_stochastic.py tests/test_loops.py tests/reliability/test_concurrency.py \
    tests/reliability/test_aoti_packages.py tests/test_service.py \
    -k "cpp or not (test_loops or test_concurrency)" ${PYTEST_ARGS:-} || status=$?
if compgen -G "$REPORTS/*" >/dev/null; then
    for report in "$REPORTS"/*; do
        echo "==== sanitizer report $report"
        cat "$report"
    done
    echo "sanitize: FAILED: sanitizer reports in $REPORTS" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "sanitize: FAILED: pytest exited with $status (86: a UBSan report, above)" >&2
    exit "$status"
fi
# The reliability cases run here, counted (fuzzed plan files, corrupt packages).
"$PYTHON" -m tests.reliability.counts "$BUILD_DIR/reliability" || true
echo "sanitize: clean (ctest and pytest passed, no sanitizer reports)"
