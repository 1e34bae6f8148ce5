#!/usr/bin/env bash
# Compiles the CUDA runner example (csrc/examples/cuda_runner) for every CUDA version it claims to
# support, on a machine without a GPU:
#   - its host side (the plain C++ files) with the C++ compiler and -Werror, against the local
#     toolkit's headers (CUDA 13: the `CUDART_VERSION >= 13000` branches of cuda_compat.h) and
#     against the CUDA 12.3 (the minimum) and 12.4 runtime headers from PyPI;
#   - against the CUDA 12.2 headers, which must stop at cuda_compat.h's #error;
#   - its device side (launch.cu with fastdiff/kernels/fused_step.cuh) with the local nvcc for
#     sm_80 and sm_90, warnings as errors.
# One line per check ("ok: ...", "skipped: ...", "FAIL: ..."); exits 1 when any check fails.
#
# The CUDA 12 headers come from PyPI wheels (nvidia-cuda-runtime-cu12 for cuda_runtime_api.h,
# nvidia-cuda-nvcc-cu12 for the crt/ headers it includes; nothing of CCCL is needed), fetched once
# with `$PYTHON -m pip download` and unpacked under $OUT/cuda12 (default build/cuda-check, which
# .gitignore covers); nothing is installed. Those wheels carry no nvcc, so the device side is
# compiled with the local toolkit only.
#
#   csrc/tools/check_cuda_headers.sh
#   environment: PYTHON (a python with pip; default .venv/bin/python, else python3), CXX (g++),
#                CUDA_HOME (the local toolkit, default /usr/local/cuda), NVCC (default
#                $CUDA_HOME/bin/nvcc, else nvcc on PATH), OUT (default build/cuda-check)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/build/cuda-check}
CXX=${CXX:-g++}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NVCC:-}" ]]; then
  if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC=$CUDA_HOME/bin/nvcc; else NVCC=$(command -v nvcc || true); fi
fi

# The host side: every plain C++ file of the example.
HOST_SOURCES=(csrc/examples/cuda_runner/cuda_runner.cpp)
# CUDA 12 header sets: name, nvidia-cuda-runtime-cu12 version, nvidia-cuda-nvcc-cu12 version (the
# last release of each minor; 12.4's runtime and nvcc wheels were numbered apart).
CUDA12_SETS=("12.3 12.3.101 12.3.107" "12.4 12.4.127 12.4.131")
CUDA12_TOO_OLD="12.2 12.2.140 12.2.140"
MIN_ERROR="the CUDA runner example needs CUDA >= 12.3"

failures=0
ok() { echo "ok: $*"; }
skipped() { echo "skipped: $*"; }
fail() {
  echo "FAIL: $1"
  [[ -n "${2:-}" ]] && sed 's/^/    /' "$2" | head -40
  failures=$((failures + 1))
}

mkdir -p "$OUT" || exit 1
cd "$ROOT" || exit 1
CXXFLAGS=(-std=c++17 -Wall -Wextra -Wpedantic -Werror -ffp-contract=off -I csrc/include -I csrc/examples)
cxx_version=$("$CXX" -dumpfullversion 2>/dev/null || "$CXX" -dumpversion)

# cuda_version INCLUDE_DIR: "13.0" from the headers' CUDART_VERSION (13000).
cuda_version() {
  local v
  v=$(sed -n 's/^#define CUDART_VERSION *\([0-9]*\).*/\1/p' "$1/cuda_runtime_api.h" | head -1)
  [[ -n "$v" ]] && echo "$((v / 1000)).$(((v % 1000) / 10))"
}

# compile_host LABEL LOG INCLUDE_DIR...: the host sources against those CUDA headers (with the
# extra flags in HOST_EXTRA).
HOST_EXTRA=()
compile_host() {
  local label=$1 log=$2 src obj
  shift 2
  local includes=()
  for dir in "$@"; do includes+=(-isystem "$dir"); done
  : >"$log"
  for src in "${HOST_SOURCES[@]}"; do
    obj=$OUT/$(basename "$src" .cpp)-$label.o
    "$CXX" "${CXXFLAGS[@]}" ${HOST_EXTRA[@]+"${HOST_EXTRA[@]}"} "${includes[@]}" -c "$src" -o "$obj" >>"$log" 2>&1 ||
      return 1
  done
}

# fetch_cuda12 NAME RUNTIME NVCC: unpacks the headers of those wheels into $OUT/cuda12/NAME once.
fetch_cuda12() {
  local name=$1 runtime=$2 nvcc=$3 dir=$OUT/cuda12/$1
  [[ -f "$dir/.complete" ]] && return 0
  rm -rf "$dir" && mkdir -p "$dir/wheels" || return 1
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir/wheels" \
    "nvidia-cuda-runtime-cu12==$runtime" "nvidia-cuda-nvcc-cu12==$nvcc" >"$dir/pip.log" 2>&1 || return 1
  "$PYTHON" - "$dir" "$dir"/wheels/*.whl <<'EOF' || return 1
import sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(("nvidia/cuda_runtime/include/", "nvidia/cuda_nvcc/include/")):
                z.extract(name, dest)
EOF
  rm -rf "$dir/wheels" && touch "$dir/.complete"
}

host_desc="host side (${HOST_SOURCES[*]}) with $CXX $cxx_version -Werror"

# 1. The local toolkit's headers.
local_version=$(cuda_version "$CUDA_HOME/include" 2>/dev/null)
if [[ -z "$local_version" ]]; then
  skipped "$host_desc against CUDA 13 headers: none at $CUDA_HOME/include (set CUDA_HOME)"
else
  if compile_host "cuda$local_version" "$OUT/host-cuda$local_version.log" "$CUDA_HOME/include"; then
    ok "$host_desc against the CUDA $local_version headers in $CUDA_HOME/include"
  else
    fail "$host_desc against the CUDA $local_version headers in $CUDA_HOME/include" "$OUT/host-cuda$local_version.log"
  fi
  [[ "${local_version%%.*}" -lt 13 ]] &&
    skipped "CUDA 13 headers: $CUDA_HOME is CUDA $local_version, so cuda_compat.h's CUDA 13 branches were not compiled"
fi

# 2. The CUDA 12 headers from PyPI: the minimum and the next release compile, an older one is refused.
for set in "${CUDA12_SETS[@]}" "$CUDA12_TOO_OLD"; do
  read -r name runtime nvcc <<<"$set"
  dir=$OUT/cuda12/$name
  wheels="nvidia-cuda-runtime-cu12==$runtime, nvidia-cuda-nvcc-cu12==$nvcc"
  if ! fetch_cuda12 "$name" "$runtime" "$nvcc"; then
    fail "fetching the CUDA $name headers ($wheels) with $PYTHON -m pip download" "$dir/pip.log"
    continue
  fi
  includes=("$dir/nvidia/cuda_runtime/include" "$dir/nvidia/cuda_nvcc/include")
  log=$OUT/host-cuda$name.log
  if [[ "$set" == "$CUDA12_TOO_OLD" ]]; then
    HOST_EXTRA=(-Wfatal-errors)  # stop at the first error: the #error, when the guard works
    if compile_host "cuda$name" "$log" "${includes[@]}"; then
      fail "the CUDA $name headers ($wheels) compiled, but cuda_compat.h should refuse them"
    elif grep -q "$MIN_ERROR" "$log"; then
      ok "the CUDA $name headers ($wheels) stop at cuda_compat.h's #error: \"$MIN_ERROR\""
    else
      fail "the CUDA $name headers ($wheels) failed before cuda_compat.h's #error" "$log"
    fi
    HOST_EXTRA=()
  elif compile_host "cuda$name" "$log" "${includes[@]}"; then
    ok "$host_desc against the CUDA $name headers ($wheels)"
  else
    fail "$host_desc against the CUDA $name headers ($wheels)" "$log"
  fi
done

# 3. The device side with the local nvcc.
device_desc="device side (launch.cu, fastdiff/kernels/fused_step.cuh) for sm_80 and sm_90, warnings as errors"
if [[ -z "$NVCC" ]]; then
  skipped "$device_desc: no nvcc (set NVCC or CUDA_HOME)"
else
  nvcc_version=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  if "$NVCC" -std=c++17 -c csrc/examples/cuda_runner/launch.cu -o "$OUT/launch.o" -I csrc/include -I csrc/examples \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Werror all-warnings \
    -Xcompiler -Wall,-Wextra,-Werror,-ffp-contract=off >"$OUT/device.log" 2>&1; then
    ok "$device_desc with nvcc ${nvcc_version:-?} ($NVCC)"
  else
    fail "$device_desc with nvcc ${nvcc_version:-?} ($NVCC)" "$OUT/device.log"
  fi
fi

exit $((failures > 0))
